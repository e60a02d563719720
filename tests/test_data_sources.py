"""Tests for data at scale: Hugging Face datasets, webdataset shards, `pack_dataset`, seeded random
transforms and the skip channel for bad files. Everything is generated offline in tmp_path."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data
import data.pack
from data import (DataSourceError, TransformConfig, WdsImages, apply_transform, build_dataset, pack_dataset,
                  parse_spec, read_skip_log, record_skip)
from data.transforms import load_image, to_tensor


# ---- helpers: images whose pixels say which item they are ----

def _id_pixels(i: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """(H, W, 3) uint8 filled with (i % 256, i // 256, 77): the item id survives PNG exactly."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[...] = (i % 256, i // 256, 77)
    return pixels


def _ident(image: torch.Tensor) -> int:
    """The id written by `_id_pixels`, read back from a (3, R, R) tensor in [-1, 1]."""
    p = ((image[:, 0, 0] + 1) * 127.5).round().to(torch.int64)
    return int(p[0]) + 256 * int(p[1])


def _npz(path: Path, n: int, classes: int = 3) -> Path:
    images = np.stack([_id_pixels(i) for i in range(n)])
    np.savez(path, images=images, labels=np.arange(n) % classes)
    return path


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """The `datasets` module with its cache in tmp_path and no progress bars."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    return datasets


def _hf_dict(hf, n: int = 6) -> tuple:
    images = [Image.fromarray(_id_pixels(i, (10, 8))) for i in range(n)]
    features = hf.Features({"img": hf.Image(), "caption": hf.Value("string"),
                            "fine": hf.ClassLabel(names=["a", "b", "c"])})
    table = hf.Dataset.from_dict({"img": images, "caption": [f"c{i}" for i in range(n)],
                                  "fine": [i % 3 for i in range(n)]}, features=features)
    return hf.DatasetDict({"train": table, "validation": table.select(range(2)), "test": table.select([5])}), images


# ---- parse_spec ----

def test_parse_spec_urls_with_query_strings():
    signed = "wds:https://host/shards-{000..009}.tar?X-Amz-Signature=ab%2F&X-Amz-Date=20240101"
    assert parse_spec(signed) == ("wds", signed[4:], {})
    assert parse_spec("wds:https://host/x.tar?token=abc?") == ("wds", "https://host/x.tar?token=abc", {})
    assert parse_spec("wds:https://host/x.tar?token=abc?shuffle=0") == ("wds", "https://host/x.tar?token=abc",
                                                                        {"shuffle": "0"})
    assert parse_spec("wds:/data/train-{0..3}.tar?shuffle=10") == ("wds", "/data/train-{0..3}.tar", {"shuffle": "10"})
    assert parse_spec("hf:user/name:cfg@validation?image=img") == ("hf", "user/name:cfg@validation", {"image": "img"})
    with pytest.raises(DataSourceError, match="key=value"):
        parse_spec("folder:/data/a?b/c")
    with pytest.raises(DataSourceError, match="unknown option.*token"):  # a URL query that looks like options
        build_dataset("wds:https://host/x.tar?token=abc", resolution=8)


# ---- Hugging Face ----

def test_hf_saved_to_disk_roundtrip(tmp_path, hf):
    table, images = _hf_dict(hf)
    table.save_to_disk(str(tmp_path / "dd"))
    ds = build_dataset(f"hf:{tmp_path / 'dd'}", resolution=8, require_labels=True)
    assert len(ds) == 6 and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    for i in range(6):
        image, label = ds[i]
        assert label == i % 3 and torch.equal(image, to_tensor(images[i], 8))
    val = build_dataset(f"hf:{tmp_path / 'dd'}", resolution=8, split="val")  # -> "validation"
    assert [_ident(val[i][0]) for i in range(len(val))] == [0, 1]
    pinned = build_dataset(f"hf:{tmp_path / 'dd'}@test", resolution=8, split="val")
    assert len(pinned) == 1 and _ident(pinned[0][0]) == 5

    # one saved Dataset (no splits), raw PNG bytes under a conventional name, integer labels by name
    raw = hf.Dataset.from_dict({"png": [_png(_id_pixels(i)) for i in range(4)], "label": [0, 2, 2, 1]})
    raw.save_to_disk(str(tmp_path / "single"))
    ds = build_dataset(f"hf:{tmp_path / 'single'}", resolution=8, split="test")
    assert [(_ident(ds[i][0]), ds[i][1]) for i in range(4)] == [(0, 0), (1, 2), (2, 2), (3, 1)]
    assert ds.num_classes == 3


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_hf_imagefolder_and_missing_split(tmp_path, hf):
    for i in range(6):
        folder = tmp_path / "imgs" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_id_pixels(i)).save(folder / f"{i}.png")
    ds = build_dataset(f"hf:{tmp_path / 'imgs'}", resolution=8)
    assert ds.class_names == ["cat", "dog"]
    got = sorted((_ident(ds[i][0]), ds[i][1]) for i in range(len(ds)))
    assert got == [(i, 0 if i % 2 else 1) for i in range(6)]
    with pytest.raises(DataSourceError, match=r"no split for 'val'.*available splits: train") as info:
        build_dataset(f"hf:{tmp_path / 'imgs'}", resolution=8, split="val")
    assert str(tmp_path / "imgs") in str(info.value)


def test_hf_errors_name_spec_and_columns(tmp_path, hf):
    table, _ = _hf_dict(hf)
    table.save_to_disk(str(tmp_path / "dd"))
    spec = f"hf:{tmp_path / 'dd'}"
    with pytest.raises(DataSourceError, match=r"image column 'pixels' does not exist; available columns: img, caption, fine"):
        build_dataset(spec + "?image=pixels", resolution=8)
    with pytest.raises(DataSourceError, match=r"label column 'y' does not exist"):
        build_dataset(spec + "?label=y", resolution=8)
    with pytest.raises(DataSourceError, match=r"split 'nope' does not exist; available splits: train, validation, test"):
        build_dataset(spec + "@nope", resolution=8)
    text_only = hf.Dataset.from_dict({"caption": ["x", "y"]})
    text_only.save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataSourceError, match=r"no image column found.*available columns: caption"):
        build_dataset(f"hf:{tmp_path / 'text'}", resolution=8)
    hf.Dataset.from_dict({"image": [], "label": []}, features=hf.Features(
        {"image": hf.Image(), "label": hf.ClassLabel(names=["a"])})).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataSourceError, match="empty") as info:
        build_dataset(f"hf:{tmp_path / 'empty'}", resolution=8)
    assert str(tmp_path / "empty") in str(info.value)
    unlabelled = hf.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))]}, features=hf.Features({"image": hf.Image()}))
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    assert build_dataset(f"hf:{tmp_path / 'unlabelled'}", resolution=4)[0][1] == -1
    with pytest.raises(DataSourceError, match=r"class-conditional training needs labels.*columns: image"):
        build_dataset(f"hf:{tmp_path / 'unlabelled'}", resolution=4, require_labels=True)


def test_hf_corrupt_bytes_skipped_and_streaming(tmp_path, hf):
    values = [{"bytes": _png(_id_pixels(i)), "path": f"{i}.png"} for i in range(5)]
    values[2] = {"bytes": b"\x89PNG not really", "path": "bad.png"}
    table = hf.Dataset.from_dict({"image": values, "label": [0, 1, 0, 1, 0]},
                                 features=hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["x", "y"])}))
    table.save_to_disk(str(tmp_path / "t"))
    ds = build_dataset(f"hf:{tmp_path / 't'}", resolution=8)
    assert [_ident(ds[i][0]) for i in range(5)] == [0, 1, 3, 3, 4]  # the bad item is replaced by the next
    assert ds.skipped_files == [f"hf:{tmp_path / 't'} item 2 (bad.png)"]

    stream = build_dataset(f"hf:{tmp_path / 't'}?streaming=1&shuffle=3", resolution=8)
    assert isinstance(stream, torch.utils.data.IterableDataset) and stream.class_names == ["x", "y"]
    orders = []
    for epoch in (0, 0, 1):
        stream.set_epoch(epoch)
        orders.append([_ident(image) for image, _ in stream])
    assert sorted(orders[0]) == [0, 1, 3, 4] and orders[0] == orders[1]
    assert len(stream.skipped_files) == 3
    unshuffled = build_dataset(f"hf:{tmp_path / 't'}?streaming=1", resolution=8, split="val")
    assert [(_ident(image), label) for image, label in unshuffled] == [(0, 0), (1, 1), (3, 1), (4, 0)]


# ---- webdataset shards and pack ----

def test_pack_and_wds_roundtrip(tmp_path):
    src = tmp_path / "src"
    for i in range(7):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_id_pixels(i, (12, 9))).save(src / f"c{i % 2}" / f"{i}.png")
    spec = f"folder:{src}?val_fraction=0"
    manifest = pack_dataset(spec, tmp_path / "packed", shard_size=3, progress=False)
    assert manifest["count"] == 7 and [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["class_names"] == ["c0", "c1"] and manifest["complete"] and manifest["skipped"] == 0
    with tarfile.open(tmp_path / "packed" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.cls", "000000000.json", "000000000.png",
                                  "000000001.cls", "000000001.json", "000000001.png",
                                  "000000002.cls", "000000002.json", "000000002.png"]
        assert {m.mtime for m in tar.getmembers()} == {0}

    folder = build_dataset(spec, resolution=8)
    shards = build_dataset(f"wds:{tmp_path / 'packed'}/shard-{{000000..000002}}.tar", resolution=8, split="val")
    assert isinstance(shards, WdsImages) and len(shards) == shards.num_samples == 7
    assert shards.class_names == ["c0", "c1"] and shards.num_classes == 2
    got = [(_digest(image), label) for image, label in shards]  # val: no shuffle, natural order
    assert got == [(_digest(folder[i][0]), folder[i][1]) for i in range(7)]  # PNG is exact

    # shards are a source like any other: repacking them keeps every image, label and class name
    repacked = pack_dataset(f"wds:{tmp_path / 'packed'}/shard-{{000000..000002}}.tar", tmp_path / "re",
                            shard_size=5, progress=False)
    assert repacked["count"] == 7 and repacked["class_names"] == ["c0", "c1"]
    again = build_dataset(f"wds:{tmp_path / 're'}/shard-{{000000..000001}}.tar", resolution=8, split="val")
    assert [(_digest(image), label) for image, label in again] == got

    # jpg at a fixed resolution, then shards without a manifest: no len(), labels still read
    pack_dataset(spec, tmp_path / "jpg", shard_size=4, resolution=6, image_format="jpg", progress=False)
    (tmp_path / "jpg" / "manifest.json").unlink()
    plain = WdsImages(str(tmp_path / "jpg" / "shard-00000{0..1}.tar"), resolution=6, split="test")
    assert plain.num_samples is None and not hasattr(plain, "__len__") and plain.num_classes is None
    items = list(plain)
    assert len(items) == 7 and all(image.shape == (3, 6, 6) for image, _ in items)
    assert [label for _, label in items] == [folder[i][1] for i in range(7)]


def _collect(dataset, num_workers: int) -> list[int]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [_ident(image) for image, _ in loader]


@pytest.mark.parametrize("shard_size", [2, 20])  # 10 shards (shard split) and 1 shard (sample split)
def test_wds_split_by_rank_and_worker(tmp_path, shard_size):
    pack_dataset(f"npz:{_npz(tmp_path / 'a.npz', 20)}", tmp_path / "p", shard_size=shard_size, progress=False)
    urls = sorted(str(p) for p in (tmp_path / "p").glob("shard-*.tar"))
    seen = []
    for rank in range(2):
        ds = WdsImages(urls, resolution=8, seed=3, shuffle_buffer=4, rank=rank, world_size=2)
        ds.set_epoch(1)
        seen.append(_collect(ds, num_workers=2))
        ds.set_epoch(1)
        assert _collect(ds, num_workers=2) == seen[-1]  # same epoch, same order
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(20))
    one = WdsImages(urls, resolution=8, seed=3, shuffle_buffer=4)
    orders = []
    for epoch in (0, 1):
        one.set_epoch(epoch)
        orders.append(_collect(one, num_workers=0))
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(20)) and orders[0] != orders[1]


def test_wds_corrupt_member_and_truncated_shard(tmp_path, caplog):
    pack_dataset(f"npz:{_npz(tmp_path / 'a.npz', 12)}", tmp_path / "p", shard_size=4, progress=False)
    shard1 = tmp_path / "p" / "shard-000001.tar"
    shard1.write_bytes(shard1.read_bytes()[:2500])  # cut in a header: tar itself stops without an error
    shard0 = tmp_path / "p" / "shard-000000.tar"  # ... and cut inside an image: tar raises
    shard0.write_bytes(shard0.read_bytes()[:3072 + 2600])
    shard2 = tmp_path / "p" / "shard-000002.tar"  # replace one image by garbage bytes
    members = []
    with tarfile.open(shard2) as tar:
        for m in tar.getmembers():
            members.append((m, b"garbage" if m.name == "000000009.png" else tar.extractfile(m).read()))
    with tarfile.open(shard2, "w") as tar:
        for m, payload in members:
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    ds = build_dataset(f"wds:{tmp_path}/p/shard-{{000000..000002}}.tar", resolution=8, split="val")
    ds.skip_log = tmp_path / "skips"
    assert [_ident(image) for image, _ in ds] == [0, 8, 10, 11]  # the rest is cut off or broken
    logged = read_skip_log(tmp_path / "skips")
    assert [(Path(what.split(":")[0]).name, reason.split(":")[0]) for what, reason in logged] == [
        ("shard-000000.tar", "ReadError"),  # unexpected end of data
        ("shard-000000.tar", "ValueError"),  # 000000001: cls and json, no image
        ("shard-000001.tar", "ValueError"),  # 000000004: no image
        ("shard-000001.tar", "read 1 of the 4 samples its manifest lists; truncated?"),
        ("shard-000002.tar", "UnidentifiedImageError")]  # 000000009
    assert len(ds.skipped_files) == 5


def test_pack_kill_and_rerun_is_byte_identical(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(11):
        Image.fromarray(_id_pixels(i, (10, 10))).save(src / f"{i:02d}.png")
    (src / "05b.png").write_bytes(b"not a png")  # skipped, and recorded identically by both runs
    spec = f"folder:{src}?val_fraction=0"
    whole = pack_dataset(spec, tmp_path / "whole", shard_size=3, resolution=8, progress=False)
    assert whole["count"] == 11 and whole["skipped"] == 1 and "05b.png" in whole["skipped_files"][0]["file"]

    real_write, calls = data.pack._write_shard, []

    def dying_write(path, entries):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real_write(path, entries)

    monkeypatch.setattr(data.pack, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        pack_dataset(spec, tmp_path / "resumed", shard_size=3, resolution=8, progress=False)
    monkeypatch.setattr(data.pack, "_write_shard", real_write)
    (tmp_path / "resumed" / "shard-000002.tar.tmp").write_bytes(b"half a shard")  # killed mid-write
    (tmp_path / "resumed" / "shard-000007.tar").write_bytes(b"unlisted")
    resumed = pack_dataset(spec, tmp_path / "resumed", shard_size=3, resolution=8, progress=False)
    assert resumed == whole

    def files(directory: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    # a damaged listed shard is rewritten; other options are refused
    (tmp_path / "resumed" / "shard-000001.tar").write_bytes(b"damaged")
    pack_dataset(spec, tmp_path / "resumed", shard_size=3, resolution=8, progress=False)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    with pytest.raises(DataSourceError, match="other options.*shard_size=3, now 4"):
        pack_dataset(spec, tmp_path / "resumed", shard_size=4, resolution=8, progress=False)
    with pytest.raises(DataSourceError, match="pass a resolution"):
        pack_dataset("synthetic:shapes?size=4", tmp_path / "syn", progress=False)


# ---- folders with bad files, and the skip channel ----

def _odd_folder(root: Path) -> tuple[list[Path], list[str]]:
    """Good images of awkward formats with bad files between them (never two bad in a row)."""
    good, bad = [], ["03_corrupt.png", "05_empty.jpg", "07_truncated.jpg"]
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    Image.fromarray(_id_pixels(1, (12, 10))).save(root / "a" / "00_rgb.png")
    Image.new("L", (10, 10), 90).save(root / "a" / "02_gray.png")
    (root / "a" / "03_corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    Image.new("RGBA", (10, 10), (10, 200, 30, 128)).save(root / "a" / "04_rgba.png")
    (root / "a" / "05_empty.jpg").write_bytes(b"")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(root / "b" / "06_cmyk.jpg")
    jpeg = io.BytesIO()
    Image.fromarray(_id_pixels(7, (32, 32))).save(jpeg, format="JPEG")
    (root / "b" / "07_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    Image.new("P", (10, 10), 3).save(root / "b" / "08_palette.png")
    Image.fromarray(_id_pixels(9)).save(root / "b" / "09_rgb.png")
    good = sorted(p for p in root.rglob("*.*") if p.name not in bad)
    return good, bad


def test_folder_bad_files_skipped_through_workers(tmp_path):
    good, bad = _odd_folder(tmp_path / "imgs")
    ds = build_dataset(f"folder:{tmp_path / 'imgs'}?val_fraction=0", resolution=8)
    ds.skip_log = tmp_path / "skips"
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images += list(batch_images)
        labels += batch_labels.tolist()
    assert len(images) == len(ds) == 9
    expected = {_digest(to_tensor(load_image(p), 8)): int(p.parent.name == "b") for p in good}
    got = {_digest(image): label for image, label in zip(images, labels)}
    assert got == expected  # every good image, with its label; bad ones replaced by their successor
    logged = read_skip_log(tmp_path / "skips")
    assert sorted(Path(what).name for what, _ in logged) == bad
    assert all(reason for _, reason in logged) and ds.skipped_files == []  # recorded in the workers


def test_record_skip_direct(tmp_path, caplog):
    class Holder:
        skip_log = None

    holder = Holder()
    record_skip(holder, "x.png", "truncated\tfile\nreally")
    assert holder.skipped_files == ["x.png"] and "x.png" in caplog.text
    assert read_skip_log(tmp_path / "none") == []
    holder.skip_log = tmp_path / "log" / "deep"
    record_skip(holder, "y.png", "bad")
    assert read_skip_log(holder.skip_log) == [("y.png", "bad")]


def test_require_labels(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataSourceError, match="class-conditional training needs labels"):
        build_dataset(f"folder:{tmp_path}?val_fraction=0", resolution=8, require_labels=True)
    assert build_dataset("synthetic:shapes?size=4", resolution=16, require_labels=True).num_classes == 10


# ---- seeded random transforms ----

def test_random_crop_flip_deterministic_per_epoch(tmp_path):
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (12, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    spec = f"folder:{tmp_path}?val_fraction=0"
    transform = TransformConfig(crop="random", hflip=True)
    a = build_dataset(spec, resolution=8, seed=1, transform=transform)
    b = build_dataset(spec, resolution=8, seed=1, transform=transform)
    epoch0 = [a[i][0] for i in range(6)]
    assert all(torch.equal(x, b[i][0]) and torch.equal(x, a[i][0]) for i, x in enumerate(epoch0))
    a.set_epoch(1)
    epoch1 = [a[i][0] for i in range(6)]
    assert any(not torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    other_seed = build_dataset(spec, resolution=8, seed=2, transform=transform)
    assert any(not torch.equal(x, other_seed[i][0]) for i, x in enumerate(epoch0))
    centre = build_dataset(spec, resolution=8)
    assert all(torch.equal(centre[i][0], to_tensor(load_image(tmp_path / f"{i}.png"), 8)) for i in range(6))

    # set_epoch reaches persistent DataLoader workers (they hold a copy made at their start)
    loader = DataLoader(b, batch_size=6, num_workers=1, persistent_workers=True)
    for epoch, expected in ((0, epoch0), (1, epoch1)):
        b.set_epoch(epoch)
        assert torch.equal(next(iter(loader))[0], torch.stack(expected))

    image = Image.fromarray(np.zeros((12, 20, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="needs an rng"):
        apply_transform(image, 8, transform)
    with pytest.raises(ValueError, match="crop"):
        TransformConfig(crop="left")


def test_synthetic_and_npz_honour_flip(tmp_path):
    plain = data.SyntheticShapes(resolution=16, size=8)
    flipped = data.SyntheticShapes(resolution=16, size=8, transform=TransformConfig(crop="random", hflip=True))
    pairs = [(plain[i][0], flipped[i][0]) for i in range(8)]
    assert all(torch.equal(p, f) or torch.equal(p.flip(-1), f) for p, f in pairs)
    assert any(not torch.equal(p, f) for p, f in pairs) and any(torch.equal(p, f) for p, f in pairs)
    npz = build_dataset(f"npz:{_npz(tmp_path / 'a.npz', 4)}", resolution=8, transform=TransformConfig(hflip=True))
    npz.set_epoch(3)
    assert [_ident(npz[i][0]) for i in range(4)] == [0, 1, 2, 3]
