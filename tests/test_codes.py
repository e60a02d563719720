"""Pre-encoded code shards: encode equals the tokenizer, resume equals uninterrupted, the dataset
refuses what it cannot trust."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from data import build_dataset
from data.codes import CodeDataset, CodeShardError, CodeShardWriter, code_dtype
from stage1_tokenizer import QuantizerConfig, VQGAN, VQGANConfig
from stage1_tokenizer import encode as encode_module
from stage1_tokenizer.encode import encode_dataset, load_code_dataset

SPEC = "synthetic:shapes?size=40"


@pytest.fixture(scope="module")
def tokenizer() -> VQGAN:
    torch.manual_seed(0)
    config = VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                         norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4))
    return VQGAN(config).eval()


@pytest.fixture(scope="module")
def images_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    ds = build_dataset(SPEC, resolution=16)
    images, labels = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def encoded_flip(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codes") / "flip"
    encode_dataset(tokenizer, SPEC, out, flip=True, batch_size=8, shard_size=16, progress=False)
    return out


def npy_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def write_set(directory: Path, codes: np.ndarray, labels: np.ndarray, *, vocab_sizes=(16,), shard_size=4,
              tokenizer_hash="a" * 64, finish=True) -> None:
    writer = CodeShardWriter(directory, tokenizer_hash=tokenizer_hash, tokenizer_config={"ch": 16},
                             code_shape=codes.shape[2:], vocab_sizes=list(vocab_sizes), variants=codes.shape[1],
                             shard_size=shard_size, source="test", class_names=None, num_classes=None)
    writer.add(codes, labels)
    if finish:
        writer.finish()


def test_code_dtype():
    assert code_dtype(16) == np.uint8 and code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16 and code_dtype(65536) == np.uint16
    assert code_dtype(65537) == np.int32


def test_shards_equal_tokenizer_encode(tokenizer, images_and_labels, encoded_flip):
    images, labels = images_and_labels
    manifest = json.loads((encoded_flip / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total"] == 40 and manifest["dtype"] == "uint8"
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["tokenizer_hash"] == tokenizer.content_hash() and manifest["code_shape"] == [8, 8]
    codes = np.concatenate([np.load(encoded_flip / s["name"]) for s in manifest["shards"]])
    stored_labels = np.concatenate([np.load(encoded_flip / s["name"].replace("codes", "labels"))
                                    for s in manifest["shards"]])
    assert codes.dtype == np.uint8 and codes.shape == (40, 2, 8, 8)
    assert stored_labels.dtype == np.int64 and np.array_equal(stored_labels, labels.numpy())
    expected = torch.cat([tokenizer.encode(images[i:i + 8]) for i in range(0, 40, 8)])
    expected_flip = torch.cat([tokenizer.encode(images[i:i + 8].flip(-1)) for i in range(0, 40, 8)])
    assert torch.equal(torch.from_numpy(codes[:, 0].astype(np.int64)), expected)
    assert torch.equal(torch.from_numpy(codes[:, 1].astype(np.int64)), expected_flip)
    assert not torch.equal(expected, expected_flip)

    ds = load_code_dataset(encoded_flip, tokenizer, variant="original")
    assert len(ds) == 40 and ds.code_shape == (8, 8) and ds.vocab_sizes == [16]
    assert ds.class_names == build_dataset(SPEC, resolution=16).class_names and ds.num_classes == 10
    item, label = ds[17]
    assert item.dtype == torch.int64 and torch.equal(item, expected[17]) and label == int(labels[17])
    assert torch.equal(CodeDataset(encoded_flip, variant="flipped")[39][0], expected_flip[39])


def test_no_flip_has_one_variant(tokenizer, images_and_labels, tmp_path):
    images, _ = images_and_labels
    manifest = encode_dataset(tokenizer, "synthetic:shapes?size=10", tmp_path / "c", batch_size=4,
                              shard_size=100, progress=False)
    assert manifest["variants"] == 1 and manifest["total"] == 10
    codes = np.load(tmp_path / "c" / "codes-000000.npy")
    assert codes.shape == (10, 1, 8, 8)
    ds = CodeDataset(tmp_path / "c")
    assert torch.equal(ds[3][0], tokenizer.encode(images[:4])[3])
    with pytest.raises(CodeShardError, match="flip"):
        CodeDataset(tmp_path / "c", variant="flipped")


class _Stream(IterableDataset):
    """A map-style dataset read as a stream, like the `wds:` / `hf:` sources."""

    def __init__(self, ds):
        self.ds, self.class_names, self.num_classes = ds, ds.class_names, ds.num_classes

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))

    def set_epoch(self, epoch: int) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True], ids=["map", "iterable"])
def test_kill_and_rerun_equals_uninterrupted(tokenizer, encoded_flip, tmp_path, monkeypatch, stream):
    if stream:
        real = encode_module.build_dataset
        monkeypatch.setattr(encode_module, "build_dataset",
                            lambda spec, **kw: _Stream(real(spec, **{k: v for k, v in kw.items() if k != "shuffle"})))
    out = tmp_path / "resumed"
    real_write = CodeShardWriter._write_shard
    calls = []

    def write_then_die(self, codes, labels):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        real_write(self, codes, labels)

    monkeypatch.setattr(CodeShardWriter, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):  # batch 6 does not divide shard 16: batches must re-align
        encode_dataset(tokenizer, SPEC, out, flip=True, batch_size=6, shard_size=16, progress=False)
    monkeypatch.setattr(CodeShardWriter, "_write_shard", real_write)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and partial["total"] == 16
    with pytest.raises(CodeShardError, match="incomplete.*vqgan encode"):
        CodeDataset(out)
    (out / "codes-000007.npy").write_bytes(b"stray")  # left by a kill between rename and manifest
    (out / ".codes-000001.npy.tmp").write_bytes(b"half")
    writer_kw = dict(tokenizer_hash=tokenizer.content_hash(), tokenizer_config={}, code_shape=(8, 8),
                     vocab_sizes=[16], variants=2, shard_size=16, source=SPEC, split="train", resolution=16,
                     class_names=partial["class_names"], num_classes=10)
    assert CodeShardWriter(out, **writer_kw).items_done == 16
    assert not (out / "codes-000007.npy").exists() and not (out / ".codes-000001.npy.tmp").exists()

    encode_dataset(tokenizer, SPEC, out, flip=True, batch_size=6, shard_size=16, progress=False)
    assert npy_files(out) == npy_files(encoded_flip)  # every npy and the manifest, byte for byte


def test_resume_with_other_options_is_refused(tokenizer, encoded_flip, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(encoded_flip, out)
    with pytest.raises(ValueError, match=r"variants.*--out"):
        encode_dataset(tokenizer, SPEC, out, flip=False, batch_size=8, shard_size=16, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        encode_dataset(tokenizer, SPEC, out, flip=True, batch_size=8, shard_size=10, progress=False)
    manifest = encode_dataset(tokenizer, SPEC, out, flip=False, batch_size=8, shard_size=16, progress=False,
                              overwrite=True)
    assert manifest["variants"] == 1 and manifest["total"] == 40


def test_dataset_refuses_other_tokenizer(encoded_flip):
    with pytest.raises(CodeShardError) as err:
        CodeDataset(encoded_flip, tokenizer_hash="b" * 64)
    manifest = json.loads((encoded_flip / "manifest.json").read_text())
    assert "b" * 64 in str(err.value) and manifest["tokenizer_hash"] in str(err.value)
    assert str(encoded_flip) in str(err.value)


def test_dataset_refuses_missing_or_truncated_shard(tmp_path):
    codes = np.random.default_rng(0).integers(0, 16, (10, 1, 3, 3))
    write_set(tmp_path / "a", codes, np.arange(10))
    (tmp_path / "a" / "codes-000001.npy").unlink()
    with pytest.raises(CodeShardError, match=r"codes-000001\.npy is missing"):
        CodeDataset(tmp_path / "a")
    write_set(tmp_path / "b", codes, np.arange(10))
    path = tmp_path / "b" / "labels-000002.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CodeShardError, match=r"labels-000002\.npy is \d+ bytes"):
        CodeDataset(tmp_path / "b")


def test_dataset_refuses_bad_manifest(tmp_path):
    with pytest.raises(CodeShardError, match=r"manifest\.json is missing"):
        CodeDataset(tmp_path)
    write_set(tmp_path / "a", np.zeros((3, 1, 2, 2), dtype=np.int64), np.zeros(3))
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text("{not json")
    with pytest.raises(CodeShardError, match=re.escape(str(manifest_path)) + ".*not valid JSON"):
        CodeDataset(tmp_path / "a")
    del manifest["shards"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CodeShardError, match=re.escape(str(manifest_path)) + ".*'shards'"):
        CodeDataset(tmp_path / "a")


def test_variant_selection_is_deterministic(tmp_path):
    n = 64
    original = np.arange(n)[:, None, None] % 16 * np.ones((n, 2, 2), dtype=np.int64)
    codes = np.stack([original, (original + 1) % 16], 1)  # (n, 2, 2, 2): variant 1 = original + 1
    write_set(tmp_path / "v", codes, np.arange(n) % 5, shard_size=10)

    def picks(ds):
        return [int(not torch.equal(ds[i][0], torch.from_numpy(original[i]))) for i in range(n)]

    a, b = CodeDataset(tmp_path / "v", seed=1), CodeDataset(tmp_path / "v", seed=1)
    assert picks(a) == picks(b) == [a.variant_of(i) for i in range(n)]
    first = picks(a)
    assert 10 < sum(first) < n - 10  # both variants are used
    a.set_epoch(1)
    assert picks(a) != first
    b.set_epoch(1)
    assert picks(a) == picks(b)
    assert picks(CodeDataset(tmp_path / "v", seed=2)) != first
    assert picks(CodeDataset(tmp_path / "v", variant="original")) == [0] * n
    assert picks(CodeDataset(tmp_path / "v", variant="flipped")) == [1] * n
    assert [CodeDataset(tmp_path / "v")[i][1] for i in range(n)] == list(np.arange(n) % 5)


def test_depth_codes_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 16, (7, 2, 3, 4)), rng.integers(0, 300, (7, 2, 3, 4))], -1)  # (N, 2, h, w, D=2)
    write_set(tmp_path / "d", codes, np.arange(7), vocab_sizes=(16, 300), shard_size=3)
    ds = CodeDataset(tmp_path / "d", variant="flipped")
    assert ds.code_shape == (3, 4, 2) and ds.vocab_sizes == [16, 300] and len(ds) == 7
    assert np.load(tmp_path / "d" / "codes-000000.npy").dtype == np.uint16
    for i in range(7):
        assert torch.equal(ds[i][0], torch.from_numpy(codes[i, 1])) and ds[i][1] == i
    bad = codes.copy()
    bad[0, 0, 0, 0, 0] = 16  # level 0 has only 16 codes
    with pytest.raises(ValueError, match="out of range"):
        write_set(tmp_path / "e", bad, np.arange(7), vocab_sizes=(16, 300))
