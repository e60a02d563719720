"""`vqgan run`: the whole pipeline on a micro config, its report, and resuming without redoing work."""
from __future__ import annotations

import json

import pytest

from common import ConfigError
from conftest import ASSETS
from vqgan.cli import main
from vqgan.run import load_run_config, run_pipeline

MICRO = """
tokenizer:
  model:
    resolution: 16
    ch: 8
    ch_mult: [1, 2]
    num_res_blocks: 1
    attn_resolutions: []
    z_channels: 8
    norm_groups: 4
    quantizer: {codebook_size: 32, code_dim: 4}
  loss: {perceptual_weight: 0.0, disc_weight: 0.1, disc_start: 3, disc_channels: 8, disc_layers: 1}
  data: {source: "synthetic:shapes?size=48&classes=3"}
  train: {steps: 4, batch_size: 8, image_every: 100, checkpoint_every: 2, eval_images: 16}
encode: {batch_size: 16}
prior:
  model: {dim: 32, depth: 1, heads: 2}
  train: {steps: 4, batch_size: 8, sample_every: 100, checkpoint_every: 2, warmup_steps: 1}
eval:
  num_samples: 12
  sample_batch_size: 5
  reference_count: 12
  grid_per_class: 2
  classifier_steps: 5
  metric_batch_size: 8
"""
INCEPTION = ASSETS / "inception" / "weights-inception-2015-12-05-fid-only.pth"
VGG = ASSETS / "lpips" / "vgg16-features-imagenet.safetensors"


@pytest.fixture()
def micro(tmp_path, monkeypatch):
    if INCEPTION.is_file():
        monkeypatch.setenv("VQGAN_INCEPTION_WEIGHTS", str(INCEPTION))
    else:
        print(f"{INCEPTION} is absent: FID/KID/PR are skipped in this run (the report says why)")
    if VGG.is_file():
        monkeypatch.setenv("VQGAN_LPIPS_VGG", str(VGG))
    else:  # as on a machine without internet: LPIPS is skipped, and the report says why
        import stage1_tokenizer.perceptual as perceptual

        def offline(cache):
            raise perceptual.PerceptualWeightsMissing("VGG16 backbone for LPIPS: no download here")
        monkeypatch.delenv("VQGAN_LPIPS_VGG", raising=False)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
        monkeypatch.setattr(perceptual, "_download_backbone", offline)
    config = tmp_path / "micro.yaml"
    config.write_text(MICRO)
    return config, tmp_path / "run"


def stage_times(out) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["finished"] + str(p.stat().st_mtime_ns)
            for p in (out / "stages").glob("*.json")}


@pytest.mark.slow
def test_run_writes_a_report_and_resumes(micro):
    config, out = micro
    assert main(["run", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"tokenizer", "encode", "prior", "sample", "eval_tokenizer", "eval_samples"}
    tok, samples = report["tokenizer"], report["samples"]
    assert tok["images"] == 12 and tok["psnr"] > 5 and 0 < tok["ssim"] <= 1
    if VGG.is_file():
        assert 0 < tok["lpips"] < 1 and tok["lpips_skipped"] is None
    else:
        assert tok["lpips"] is None and "VGG16" in tok["lpips_skipped"]
    assert 0 < tok["codebook_usage"] <= 1 and tok["perplexity"] >= 1
    if INCEPTION.is_file():
        assert tok["rfid"] >= 0 and samples["fid"] > 0 and 0 <= samples["precision"] <= 1
        assert samples["is_mean"] is None and samples["is_reason"]  # the offline weights have no logits layer
    else:
        assert "skipped" in samples
    assert 0 <= samples["on_class_accuracy"] <= 1 and samples["num_samples"] == 12
    assert report["versions"]["torch"] and report["config"]["eval"]["num_samples"] == 12
    assert len(list((out / "samples").glob("*.png"))) == 12
    for grid in ("grids/samples_per_class.png", "grids/reconstructions.png"):
        assert (out / grid).is_file() and grid in (out / "report.md").read_text()

    # a rerun does nothing but report that the stages are done
    before = stage_times(out)
    assert main(["run", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert stage_times(out) == before

    # killed while sampling: the sample marker and the last batch's files are missing
    (out / "stages" / "sample.json").unlink()
    for name in ("000010.png", "000011.png"):
        (out / "samples" / name).unlink()
    kept = (out / "samples" / "000000.png").stat().st_mtime_ns
    assert main(["run", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    after = stage_times(out)
    assert all(after[s] == before[s] for s in ("tokenizer", "encode", "prior"))    # not redone
    assert all(after[s] != before[s] for s in ("sample", "eval_samples", "report"))
    assert (out / "samples" / "000000.png").stat().st_mtime_ns == kept                 # finished batches kept
    assert len(list((out / "samples").glob("*.png"))) == 12

    # other settings for a finished stage: refused, unless that stage is forced
    with pytest.raises(ConfigError, match="--force sample"):
        run_pipeline(load_run_config(config, out, ["eval.cfg_scale=1.5"]), out, device="cpu")
    assert main(["run", "--config", str(config), "--out", str(out), "--device", "cpu", "--force", "sample",
                 "eval.cfg_scale=1.5"]) == 0
    assert json.loads((out / "report.json").read_text())["sampling"]["cfg_scale"] == 1.5
    # samples of the old settings were not reused: every batch was drawn again
    assert (out / "samples" / "000000.png").stat().st_mtime_ns != kept
    assert len(list((out / "samples").glob("*.png"))) == 12


def test_run_config_errors(micro, capsys):
    config, out = micro
    with pytest.raises(ConfigError, match="start with a section"):
        load_run_config(config, out, ["steps=3"])
    with pytest.raises(ConfigError, match="num_sample"):
        load_run_config(config, out, ["eval.num_sample=3"])
    cfg = load_run_config(config, out, ["prior.train.steps=7"])
    assert cfg.prior.train.steps == 7 and cfg.prior.train.out_dir == str(out / "stage2")
    assert cfg.prior.data.codes == str(out / "codes") and cfg.tokenizer.train.out_dir == str(out / "stage1")
    assert main(["run", "--config", str(config), "--out", str(out), "tokenizer.model.ch=x"]) == 2
    assert "model.ch" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_a_masked_prior(micro):
    config, out = micro
    assert main(["run", "--config", str(config), "--out", str(out), "--device", "cpu",
                 "prior.model.prior_type=masked", "eval.decode_steps=4"]) == 0
    report = json.loads((out / "report.json").read_text())
    saved = json.loads((out / "stage2" / "prior" / "config.json").read_text())
    assert saved["config"]["prior_type"] == "masked" and saved["config"]["positions"] == "learned"
    assert report["sampling"]["prior_type"] == "masked" and report["sampling"]["steps"] == 4
    assert report["samples"]["num_samples"] == 12 and len(list((out / "samples").glob("*.png"))) == 12
    assert "Masked prior, 4 decoding steps." in (out / "report.md").read_text()
