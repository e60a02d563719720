"""Data sources through the real commands: pack -> train on shards -> encode to code shards."""
from __future__ import annotations

import json

import pytest
import torch

import data
from common import load_config
from data.codes import CodeDataset
from stage1_tokenizer import VQGAN
from stage1_tokenizer.train import TokenizerTrainConfig, train
from test_train_tokenizer import TINY, read_metrics
from vqgan.cli import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "pack", "synthetic:shapes?size=44", "--out", str(out), "--resolution", "20",
                 "--shard-size", "16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 44 and [s["count"] for s in manifest["shards"]] == [16, 16, 12]
    return f"wds:{out}/shard-{{000000..000002}}.tar"


def test_tokenizer_trains_on_shards_with_random_crops_and_resumes_exactly(tmp_path, shards):
    extra = [f"data.source={shards}", "data.val_source=synthetic:shapes?size=16", "data.crop=random",
             "data.hflip=true", "data.num_workers=2"]

    def cfg(out, steps):
        return load_config(TokenizerTrainConfig, None, TINY + extra + [f"train.out_dir={out}", f"train.steps={steps}"])

    train(cfg(tmp_path / "full", 7))       # 44 images in batches of 8: epochs end mid-run
    train(cfg(tmp_path / "part", 4))
    train(cfg(tmp_path / "part", 7), resume="auto")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert len(a) == len(b) == 7
    for ma, mb in zip(a, b):
        assert ma["loss/total"] == pytest.approx(mb["loss/total"], rel=1e-6, abs=1e-7), ma["step"]


def test_encode_command_writes_code_shards(tmp_path, shards):
    tok_dir = tmp_path / "run"
    train(load_config(TokenizerTrainConfig, None, TINY + [f"train.out_dir={tok_dir}", "train.steps=1"]))
    assert main(["encode", "--tokenizer", str(tok_dir / "tokenizer"), "--data", shards, "--out",
                 str(tmp_path / "codes"), "--flip", "--shard-size", "20", "--resolution", "16"]) == 0
    tokenizer = VQGAN.from_pretrained(tok_dir / "tokenizer")
    codes = CodeDataset(tmp_path / "codes", tokenizer_hash=tokenizer.content_hash(), variant="original")
    assert len(codes) == 44 and codes.code_shape == (8, 8) and codes.manifest["variants"] == 2
    first, label = codes[0]
    image, expected_label = next(iter(data.build_dataset(shards, resolution=16, shuffle=False)))
    assert label == expected_label
    assert torch.equal(first, tokenizer.encode(image[None])[0])


def test_encode_refuses_other_tokenizer(tmp_path, shards, capsys):
    for name, steps in (("a", "1"), ("b", "2")):
        train(load_config(TokenizerTrainConfig, None, TINY + [f"train.out_dir={tmp_path / name}", f"train.steps={steps}"]))
    assert main(["encode", "--tokenizer", str(tmp_path / "a" / "tokenizer"), "--data", "synthetic:shapes?size=8",
                 "--out", str(tmp_path / "codes"), "--resolution", "16"]) == 0
    other = VQGAN.from_pretrained(tmp_path / "b" / "tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        CodeDataset(tmp_path / "codes", tokenizer_hash=other.content_hash())
    code = main(["encode", "--tokenizer", str(tmp_path / "b" / "tokenizer"), "--data", "synthetic:shapes?size=8",
                 "--out", str(tmp_path / "codes"), "--resolution", "16"])
    assert code == 2 and "tokenizer" in capsys.readouterr().err


def test_pack_of_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "pack", f"folder:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
