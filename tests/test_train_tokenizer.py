"""Stage-1 training loop: it learns, it resumes exactly, the CLI drives it."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import load_config
from stage1_tokenizer import VQGAN
from stage1_tokenizer.train import TokenizerTrainConfig, get_lr, train

REPO = Path(__file__).resolve().parents[1]

# GAN from step 3, EMA weights, dead-code revival: every piece of state a resume must restore
TINY = [
    "model.resolution=16", "model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[8]", "model.z_channels=8", "model.norm_groups=8",
    "model.quantizer.codebook_size=16", "model.quantizer.code_dim=4", "model.quantizer.dead_code_patience=2",
    "loss.perceptual_weight=0", "loss.disc_start=3", "loss.disc_channels=8", "loss.disc_layers=1",
    "loss.lecam_weight=0.1",
    "data.source=synthetic:shapes?size=40",  # 5 batches an epoch: resumes land mid-epoch
    "train.batch_size=8", "train.checkpoint_every=2", "train.image_every=3", "train.log_every=2",
    "train.ema_decay=0.9", "train.eval_images=16", "train.lr=1e-3",
]


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_cfg(out_dir: Path, *extra: str) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, None, TINY + [f"train.out_dir={out_dir}", *extra])


def test_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    train(tiny_cfg(full, "train.steps=7"))

    part = tmp_path / "part"
    train(tiny_cfg(part, "train.steps=4"))  # stops after its step-4 checkpoint, as a killed run would
    train(tiny_cfg(part, "train.steps=7"), resume="auto")

    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == list(range(1, 8))
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for key in ma:
            assert ma[key] == pytest.approx(mb[key], rel=1e-6, abs=1e-7), (ma["step"], key)
    assert "loss/disc" in a[-1] and "gan/weight" in a[-1]
    ta = VQGAN.from_pretrained(full / "tokenizer")
    tb = VQGAN.from_pretrained(part / "tokenizer")
    for (name, x), (_, y) in zip(ta.state_dict().items(), tb.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_training_writes_outputs_and_learns(tmp_path):
    out = tmp_path / "run"
    results = train(tiny_cfg(out, "train.steps=30", "loss.disc_start=100", "train.lr=2e-3"))
    metrics = read_metrics(out)
    first = sum(m["loss/l1"] for m in metrics[:5]) / 5
    last = sum(m["loss/l1"] for m in metrics[-5:]) / 5
    assert last < first
    assert (out / "tokenizer" / "model.safetensors").is_file()
    assert (out / "images" / "final.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000028", "step_00000030"]
    assert json.loads((out / "final_metrics.json").read_text())["psnr"] == pytest.approx(results["psnr"])
    assert results["psnr"] > results["mean_colour_psnr"] - 3  # sanity: not garbage after 30 steps
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    train(tiny_cfg(tmp_path / "r", "train.steps=1"), resume="auto")
    assert len(read_metrics(tmp_path / "r")) == 1


def test_lr_schedule():
    cfg = load_config(TokenizerTrainConfig, None, ["train.warmup_steps=10", "train.steps=110",
                                                   "train.lr_schedule=cosine", "train.min_lr_ratio=0.1"]).train
    assert get_lr(0, 1.0, cfg) == pytest.approx(0.1)
    assert get_lr(9, 1.0, cfg) == pytest.approx(1.0)
    assert get_lr(60, 1.0, cfg) == pytest.approx(0.55)
    assert get_lr(110, 1.0, cfg) == pytest.approx(0.1)


def _vqgan(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqgan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_train_and_reconstruct(tmp_path):
    out = tmp_path / "cli"
    proc = _vqgan("train-tokenizer", "--config", "configs/tiny.yaml", *TINY, "train.steps=3",
                  f"train.out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out PSNR" in proc.stdout

    from PIL import Image
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 24), (40 * i, 100, 200)).save(images / f"{i}.png")
    proc = _vqgan("reconstruct", "--tokenizer", str(out / "tokenizer"), "--images", str(images),
                  "--out", str(tmp_path / "rec"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert metrics["images"] == 3 and "psnr" in metrics and "codebook_usage" in metrics
    assert len(list((tmp_path / "rec" / "recon").glob("*.png"))) == 3
    assert (tmp_path / "rec" / "grid.png").is_file()


def test_cli_bad_input_gives_clear_errors(tmp_path, capsys):
    from vqgan.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    code, err = run("train-tokenizer", "--config", str(REPO / "configs/tiny.yaml"), "train.stepz=3")
    assert code == 2 and "unknown key(s) ['stepz']" in err
    code, err = run("train-tokenizer", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml does not exist" in err
    code, err = run("train-tokenizer", "--config", str(REPO / "configs/tiny.yaml"), "train.steps=abc")
    assert code == 2 and "train.steps: expected an integer" in err
    code, err = run("train-tokenizer", "loss.perceptual_weight=0", "data.source=folder:/nonexistent/images")
    assert code == 2 and "/nonexistent/images" in err
    code, err = run("reconstruct", "--tokenizer", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "config.json is missing" in err


def test_perceptual_weights_missing_stops_at_startup(tmp_path, monkeypatch, capsys):
    from vqgan.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("VQGAN_LPIPS_VGG", raising=False)
    code = main(["train-tokenizer", *TINY, "loss.perceptual_weight=1.0", f"train.out_dir={tmp_path / 'p'}"])
    assert code == 2
    assert "loss.perceptual_weight=0" in capsys.readouterr().err
    assert not (tmp_path / "p" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_killed_run_resumes(tmp_path):
    """SIGKILL a real training process after its first checkpoint; `--resume auto` finishes it
    with the same losses as an uninterrupted run."""
    args = ["train-tokenizer", "--config", "configs/tiny.yaml", *TINY, "train.steps=12",
            "train.checkpoint_every=4"]
    ref = _vqgan(*args, f"train.out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vqgan", *args, f"train.out_dir={out}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_00000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _vqgan(*args, f"train.out_dir={out}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = read_metrics(tmp_path / "ref"), read_metrics(out)
    assert [m["step"] for m in b] == list(range(1, 13))
    for ma, mb in zip(a, b):
        assert ma["loss/total"] == pytest.approx(mb["loss/total"], rel=1e-6, abs=1e-7)
