"""Shared test helpers. Real weights and images that cannot be downloaded here live in
`../shared/assets` (or $VQGAN_ASSETS); tests that need them skip with the reason when absent."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VQGAN_ASSETS") or REPO.parent / "shared" / "assets")


def asset(relative: str) -> Path:
    """Path of an offline asset, or skip the calling test saying which file is missing."""
    path = ASSETS / relative
    if not path.is_file():
        pytest.skip(f"asset {path} is absent (set VQGAN_ASSETS to the folder holding it)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # a fixed thread count keeps float reductions identical run to run
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def one_thread():
    """Tiny models are latency-bound: a second OpenMP thread only adds barrier waits, ten times
    slower or worse on a busy machine. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_PRIOR = ["model.dim=32", "model.depth=2", "model.heads=2", "train.batch_size=8", "train.warmup_steps=2",
              "train.sample_every=1000", "train.checkpoint_every=2", "train.mixed_precision=no"]


@pytest.fixture(scope="session")
def tiny_stage2(tmp_path_factory) -> Path:
    """A random 16 px tokenizer (8x8 codes of 16) and a class-conditional prior trained 3 steps on its
    codes of 3 shape classes: ROOT/tokenizer, ROOT/codes, ROOT/prior_run/prior."""
    from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig
    from stage1_tokenizer.encode import encode_dataset
    from vqgan.cli import main

    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  z_channels=8, norm_groups=8,
                                  quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))
    tokenizer.save_pretrained(root / "tokenizer")
    encode_dataset(tokenizer, "synthetic:shapes?size=32&classes=3", root / "codes", progress=False)
    code = main(["train-prior", "--config", str(REPO / "configs/tiny.yaml"), *TINY_PRIOR, "train.steps=3",
                 f"train.out_dir={root / 'prior_run'}", f"data.codes={root / 'codes'}",
                 f"data.tokenizer={root / 'tokenizer'}"])
    assert code == 0
    return root


@pytest.fixture(scope="session")
def tiny_masked(tiny_stage2: Path) -> Path:
    """A class-conditional masked (MaskGIT) prior trained 3 steps on tiny_stage2's codes: the prior directory
    (its tokenizer is tiny_stage2 / "tokenizer")."""
    from vqgan.cli import main

    out = tiny_stage2 / "masked_run"
    code = main(["train-prior", "--config", str(REPO / "configs/tiny.yaml"), *TINY_PRIOR, "train.steps=3",
                 "model.prior_type=masked", f"train.out_dir={out}", f"data.codes={tiny_stage2 / 'codes'}",
                 f"data.tokenizer={tiny_stage2 / 'tokenizer'}"])
    assert code == 0
    return out / "prior"


def serve_client(dirs: tuple[Path, Path], **settings):
    """An in-process `vqgan serve` app for (prior dir, tokenizer dir) as a FastAPI TestClient; max_batch 4
    unless `settings` say otherwise. Use it as a context manager (startup and shutdown run the worker)."""
    from fastapi.testclient import TestClient

    from vqgan.serve import ServeSettings, create_app

    return TestClient(create_app(*dirs, ServeSettings(**{"max_batch": 4, **settings})))


@contextmanager
def live_server(prior: Path, tokenizer: Path, api_key: str) -> Iterator[str]:
    """`python -m vqgan serve` on a free loopback port with an API key; yields its URL once /health
    answers, and always stops the server."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VQGAN_API_KEY": api_key}
    server = subprocess.Popen([sys.executable, "-m", "vqgan", "serve", "--prior", str(prior), "--tokenizer",
                               str(tokenizer), "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
