"""VQGAN+CLIP (`stage1_tokenizer.clip_guide`, `vqgan clip-guide`) with a random tiny tokenizer and CLIP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is not installed (pip install open-clip-torch)")

from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig  # noqa: E402
from stage1_tokenizer.clip_guide import (ClipGuideConfig, ClipLoadError, ClipWeightsUnavailable,  # noqa: E402
                                         clip_guide, load_clip)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _tokenizer(quantizer: QuantizerConfig | None = None) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                             z_channels=8, norm_groups=8,
                             quantizer=quantizer or QuantizerConfig(codebook_size=16, code_dim=4)))


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def tiny_clip(clip_config):
    return load_clip(str(clip_config), None)


def _run(tokenizer, tiny_clip, seed=0, steps=20, **options):
    model, stats, tokenize = tiny_clip
    config = ClipGuideConfig(prompt="a red apple on a table", steps=steps, cutouts=8, every=5, seed=seed, **options)
    return clip_guide(tokenizer, model, stats, tokenize([config.prompt]), config, progress=False)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_falls_and_tokenizer_is_untouched(tiny_clip):
    tokenizer = _tokenizer()
    tokenizer.train()  # the run must not change modes, flags, weights or buffers (usage counters included)
    before, clip_before = _state(tokenizer), _state(tiny_clip[0])
    result = _run(tokenizer, tiny_clip)
    losses = result["losses"]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"CLIP loss: first 5 mean {first:.4f}, last 5 mean {last:.4f}")
    assert last < first - 0.01, losses
    assert result["image"].shape == (1, 3, 16, 16)
    assert result["image"].abs().max() <= 1
    assert result["frames"].shape == (5, 3, 16, 16) and result["frame_steps"] == [0, 5, 10, 15, 20]
    assert not torch.equal(result["frames"][0], result["frames"][-1])  # the codes changed
    after = _state(tokenizer)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, _state(tiny_clip[0])[k]) for k, v in clip_before.items())
    assert tokenizer.training and all(p.requires_grad and p.grad is None for p in tokenizer.parameters())


def test_deterministic_for_a_seed(tiny_clip):
    tokenizer = _tokenizer()
    a, b = _run(tokenizer, tiny_clip, steps=6), _run(tokenizer, tiny_clip, steps=6)
    assert a["losses"] == b["losses"] and torch.equal(a["image"], b["image"]) and torch.equal(a["frames"], b["frames"])
    c = _run(tokenizer, tiny_clip, seed=1, steps=6)
    assert c["losses"] != a["losses"] and not torch.equal(c["image"], a["image"])


def test_init_image_and_rvq(tiny_clip):
    # an init image starts from its encoding; multi-level (rvq) codes work through the public API
    tokenizer = _tokenizer(QuantizerConfig(type="rvq", codebook_size=16, code_dim=4, depth=2))
    before = _state(tokenizer)
    model, stats, tokenize = tiny_clip
    init = torch.rand(1, 3, 16, 16) * 2 - 1
    config = ClipGuideConfig(prompt="a cat", steps=3, cutouts=4, every=1)
    result = clip_guide(tokenizer, model, stats, tokenize([config.prompt]), config, init=init, progress=False)
    with torch.no_grad():
        start = tokenizer.decode(tokenizer.encode(init))
    assert torch.allclose(result["frames"][0], start, atol=1e-5)
    assert all(torch.equal(v, _state(tokenizer)[k]) for k, v in before.items())


def test_vqvae2_refused(tiny_clip):
    tokenizer = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  z_channels=8, norm_groups=8, quantizer=QuantizerConfig(type="vqvae2", code_dim=4,
                                                                                         codebook_size=16)))
    with pytest.raises(ValueError, match="vqvae2"):
        _run(tokenizer, tiny_clip, steps=1)


def test_missing_pretrained_weights_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # no network: the Hub client must answer from the (empty) cache at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ClipWeightsUnavailable) as info:
        load_clip("RN50", "openai", cache_dir=str(tmp_path / "empty_cache"))
    message = str(info.value)
    assert "'RN50'" in message and "'openai'" in message and "--clip-weights" in message and "HF_HOME" in message
    with pytest.raises(ClipLoadError, match="no pretrained tag 'nope'"):
        load_clip("RN50", "nope")
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_clip("RN50", None, weights_path=tmp_path / "missing.pt")


def test_cli_end_to_end(clip_config, tmp_path):
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    Image.new("RGB", (24, 20), (200, 40, 40)).save(tmp_path / "init.png")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vqgan", "clip-guide", "--tokenizer", str(tmp_path / "tok"), "--prompt", "a red apple",
           "--steps", "4", "--cutouts", "4", "--every", "2", "--seed", "3", "--clip-model", str(clip_config),
           "--clip-pretrained", "none", "--device", "cpu", "--out", str(out)]
    run = subprocess.run([*cmd, "--init", str(tmp_path / "init.png")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with Image.open(out / "final.png") as final, Image.open(out / "progress.png") as grid:
        assert final.size == (16, 16)
        assert grid.size == (3 * 18 + 2, 16 + 4)  # frames at steps 0, 2 and the final, 2 px padding
    record = json.loads((out / "clip_guide.json").read_text())
    assert len(record["losses"]) == 4 and record["seed"] == 3 and record["frame_steps"] == [0, 2, 4]
    assert record["options"]["prompt"] == "a red apple" and record["init"].endswith("init.png")

    bad = subprocess.run([*cmd[:-2], "--steps", "0", "--out", str(tmp_path / "bad")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--steps" in bad.stderr and "Traceback" not in bad.stderr
