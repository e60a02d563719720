"""Stage 2 through the console script: train-prior -> sample -> complete, and the errors a user meets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig
from stage2_prior.images import box_to_keep_mask
from conftest import TINY_PRIOR
from vqgan.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_stage2):
    return tiny_stage2


def test_sample_command_writes_images_per_class(trained, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "-m", "vqgan", "sample", "--prior", str(trained / "prior_run" / "prior"),
                           "--tokenizer", str(trained / "tokenizer"), "--classes", "0,2", "--n", "3", "--cfg", "2.0",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(out.glob("0000*.png"))) == 6 and (out / "grid.png").is_file()
    record = json.loads((out / "samples.json").read_text())
    assert record["classes"] == [0, 2] and record["cfg_scale"] == 2.0 and record["weights_dtype"] == "model"
    fast = tmp_path / "bf16"
    assert main(["sample", "--prior", str(trained / "prior_run" / "prior"), "--tokenizer", str(trained / "tokenizer"),
                 "--classes", "1", "--n", "2", "--weights", "bf16", "--out", str(fast)]) == 0
    assert json.loads((fast / "samples.json").read_text())["weights_dtype"] == "torch.bfloat16"


def test_complete_keeps_codes_outside_the_box(trained, tmp_path):
    images = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        path = tmp_path / f"in{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        images.append(str(path))
    out = tmp_path / "completed"
    assert main(["complete", "--prior", str(trained / "prior_run" / "prior"), "--tokenizer", str(trained / "tokenizer"),
                 "--images", *images, "--box", "8,8,16,16", "--samples", "2", "--label", "1", "--out", str(out)]) == 0
    record = json.loads((out / "completion.json").read_text())
    assert record["kept_codes_unchanged"] and record["regenerated_positions"] == 16 and record["kept_positions"] == 48
    assert (out / "grid.png").is_file()


def test_box_to_keep_mask_counts_partial_positions():
    keep = box_to_keep_mask((3, 0, 5, 4), (16, 16), (8, 8))  # f = 2: x 3..5 touches columns 1 and 2
    assert (~keep).nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    with pytest.raises(ValueError, match="box"):
        box_to_keep_mask((0, 0, 17, 4), (16, 16), (8, 8))


def test_user_errors_are_clear(trained, tmp_path, capsys):
    prior, tok = str(trained / "prior_run" / "prior"), str(trained / "tokenizer")

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    code, err = run("sample", "--prior", prior, "--tokenizer", tok, "--classes", "7", "--out", str(tmp_path / "a"))
    assert code == 2 and "class ids must lie in [0, 3)" in err

    other = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                              z_channels=8, norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))
    other.save_pretrained(tmp_path / "other_tok")
    code, err = run("sample", "--prior", prior, "--tokenizer", str(tmp_path / "other_tok"), "--out", str(tmp_path / "b"))
    assert code == 2 and "tokenizer" in err

    uncond_run = tmp_path / "uncond"
    assert main(["train-prior", "--config", str(REPO / "configs/tiny.yaml"), *TINY_PRIOR, "train.steps=1",
                 f"train.out_dir={uncond_run}", f"data.codes={trained / 'codes'}", f"data.tokenizer={tok}",
                 "data.conditional=false"]) == 0
    capsys.readouterr()
    code, err = run("sample", "--prior", str(uncond_run / "prior"), "--tokenizer", tok, "--cfg", "3",
                    "--out", str(tmp_path / "c"))
    assert code == 2 and "classifier-free guidance needs a class-conditional prior" in err

    code, err = run("complete", "--prior", prior, "--tokenizer", tok, "--images", str(tmp_path / "missing.png"),
                    "--out", str(tmp_path / "d"))
    assert code == 2 and "missing.png does not exist" in err
