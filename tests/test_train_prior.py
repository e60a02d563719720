"""Stage-2 training loop: it learns, writes its outputs, resumes exactly after a kill, gives the
same loss curve on two processes as on one, and refuses shards from another tokenizer."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import ConfigError, load_config
from common.checkpoint import truncate_metrics
from data.codes import CodeShardError
from stage1_tokenizer import QuantizerConfig, VQGAN, VQGANConfig
from stage1_tokenizer.encode import encode_dataset
from stage2_prior import GPTPrior
from stage2_prior.train import PriorRunConfig, get_lr, train

REPO = Path(__file__).resolve().parents[1]

TOKENIZER = VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                        norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
SOURCE = "synthetic:shapes?size=48&classes=3"  # 48 items: 6 batches of 8 an epoch, 8 x 8 codes of 16


def _tokenizer(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(TOKENIZER)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prior_data")
    tokenizer = _tokenizer(0)
    tokenizer.save_pretrained(root / "tokenizer")
    encode_dataset(tokenizer, SOURCE, root / "codes", flip=True, progress=False)
    _tokenizer(1).save_pretrained(root / "other_tokenizer")
    return {"tokenizer": root / "tokenizer", "codes": root / "codes", "other": root / "other_tokenizer"}


def tiny_cfg(shards: dict[str, Path], out_dir: Path, *extra: str) -> PriorRunConfig:
    return load_config(PriorRunConfig, None, _overrides(shards, out_dir, *extra))


def _overrides(shards: dict[str, Path], out_dir: Path, *extra: str) -> list[str]:
    return ["model.dim=32", "model.depth=2", "model.heads=2", f"data.codes={shards['codes']}",
            f"data.tokenizer={shards['tokenizer']}", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
            "train.log_every=2", "train.sample_every=1000", "train.checkpoint_every=1000", f"train.out_dir={out_dir}",
            *extra]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict], rel: float, keys=("loss", "bits_per_token", "lr", "grad_norm")):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in keys:
            assert ma[key] == pytest.approx(mb[key], rel=rel, abs=1e-7), (ma["step"], key, ma[key], mb[key])


def test_training_learns_and_writes_outputs(shards, tmp_path):
    out = tmp_path / "run"
    stats = train(tiny_cfg(shards, out, "train.steps=40", "train.sample_every=30", "train.checkpoint_every=20",
                           "train.ema_decay=0.9", "train.log_every=10"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 41))
    first = sum(m["loss"] for m in metrics[:5]) / 5
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < first - 0.3, (first, last)  # uniform over 16 codes is ln 16 = 2.77
    assert metrics[-1]["bits_per_token"] == pytest.approx(metrics[-1]["loss"] / 0.6931471805599453)
    assert stats["steps"] == 40 and stats["loss"] == pytest.approx(metrics[-1]["loss"]) and stats["tokens_per_s"] > 0
    assert json.loads((out / "final_stats.json").read_text())["loss"] == pytest.approx(stats["loss"])

    assert (out / "prior" / "config.json").is_file() and (out / "prior" / "model.safetensors").is_file()
    hash_ = VQGAN.from_pretrained(shards["tokenizer"]).content_hash()
    prior = GPTPrior.from_pretrained(out / "prior", tokenizer_hash=hash_)
    assert prior.config.num_classes == 3 and prior.config.code_shape == (8, 8) and prior.config.vocab_sizes == (16,)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    assert (out / "samples" / "step_00000030.png").is_file() and (out / "samples" / "final.png").is_file()
    from PIL import Image
    assert Image.open(out / "samples" / "final.png").size == (8 * 17 + 1, 3 * 17 + 1)  # 3 classes x 8, 16 px + pad
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert json.loads((out / "config.json").read_text())["model"]["num_classes"] == 3


_KILLED_RUN = """
import json, os, signal, sys
import torch
import stage2_prior.train as T
from common import load_config
torch.set_num_threads(2)
real_get_lr = T.get_lr
def get_lr(step, cfg):  # the start of step 7: steps 5-6 are logged but not checkpointed
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_get_lr(step, cfg)
T.get_lr = get_lr
T.train(load_config(T.PriorRunConfig, None, json.loads(sys.argv[1])))
"""


def test_killed_run_resumes_exactly(shards, tmp_path):
    # label dropout, random flip variants, EMA: all state a resume must restore
    # (no tokenizer: sample grids cost seconds here, and they leave the global RNG alone)
    extra = ("train.steps=8", "train.checkpoint_every=4", "train.ema_decay=0.9", "model.class_dropout=0.25",
             "data.tokenizer=")
    full = tmp_path / "full"
    train(tiny_cfg(shards, full, *extra))

    part = tmp_path / "part"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(_overrides(shards, part, *extra))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(part)] == list(range(1, 7))
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_00000004"]

    stats = train(tiny_cfg(shards, part, *extra), resume="auto")
    assert stats["steps"] == 8
    assert_same_curves(read_metrics(full), read_metrics(part), rel=1e-6)
    a, b = GPTPrior.from_pretrained(full / "prior"), GPTPrior.from_pretrained(part / "prior")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(shards, tmp_path):
    """2 processes x batch 4 follow 1 process x batch 8: same global batches, averaged gradients."""
    import _prior_ddp_worker

    # 8 steps cross an epoch boundary (6 global batches an epoch); no label dropout: its draws differ per rank
    extra = ("train.steps=8", "model.class_dropout=0", "data.tokenizer=")
    train(tiny_cfg(shards, tmp_path / "one", *extra))
    overrides = _overrides(shards, tmp_path / "two", *extra, "train.batch_size=4")
    torch.multiprocessing.spawn(_prior_ddp_worker.run, args=(2, _free_port(), overrides), nprocs=2, join=True)
    two = read_metrics(tmp_path / "two")
    assert_same_curves(read_metrics(tmp_path / "one"), two, rel=1e-4)
    assert json.loads((tmp_path / "two" / "final_stats.json").read_text())["num_processes"] == 2


def test_grad_accum_matches_a_bigger_batch(shards, tmp_path):
    extra = ("train.steps=3", "model.class_dropout=0", "data.tokenizer=")
    train(tiny_cfg(shards, tmp_path / "big", *extra))
    train(tiny_cfg(shards, tmp_path / "accum", *extra, "train.batch_size=4", "train.grad_accum=2"))
    assert_same_curves(read_metrics(tmp_path / "big"), read_metrics(tmp_path / "accum"), rel=1e-5)


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    truncate_metrics(tmp_path / "absent.jsonl", 2)  # nothing to do


def test_shards_from_another_tokenizer_stop_at_startup(shards, tmp_path):
    right = VQGAN.from_pretrained(shards["tokenizer"]).content_hash()
    wrong = VQGAN.from_pretrained(shards["other"]).content_hash()
    out = tmp_path / "bad"
    with pytest.raises(CodeShardError) as err:
        train(tiny_cfg(shards, out, "train.steps=2", f"data.tokenizer={shards['other']}"))
    assert right in str(err.value) and wrong in str(err.value)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_unconditional_prior(shards, tmp_path):
    out = tmp_path / "uncond"
    train(tiny_cfg(shards, out, "train.steps=2", "train.sample_every=2", "data.conditional=false"))
    assert GPTPrior.from_pretrained(out / "prior").config.num_classes == 0
    from PIL import Image
    assert Image.open(out / "samples" / "step_00000002.png").size == (8 * 17 + 1, 4 * 17 + 1)


def test_conditional_needs_labels(shards, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    encode_dataset(VQGAN.from_pretrained(shards["tokenizer"]), "synthetic:shapes?size=8&classes=3", unlabelled,
                   progress=False)
    manifest = json.loads((unlabelled / "manifest.json").read_text())
    manifest.update(num_classes=None, class_names=None)
    (unlabelled / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="data.conditional=false"):
        train(tiny_cfg(shards, tmp_path / "c", "train.steps=1", f"data.codes={unlabelled}"))


def test_lr_schedule():
    cfg = load_config(PriorRunConfig, None, ["train.warmup_steps=10", "train.steps=110", "train.lr=1.0",
                                             "train.min_lr_ratio=0.1"]).train
    assert get_lr(0, cfg) == pytest.approx(0.1)
    assert get_lr(9, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)
    assert get_lr(110, cfg) == pytest.approx(0.1)
