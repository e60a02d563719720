"""Tests for the data package: synthetic shapes, image folders, loading odd files, spec strings."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataSourceError, ImageFolderDataset, SHAPE_CLASSES, SyntheticShapes, build_dataset, parse_spec
from data.transforms import load_image, to_tensor


def _check_item(item, resolution: int) -> None:
    image, label = item
    assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert type(label) is int


# ---- synthetic ----

def test_synthetic_items():
    ds = SyntheticShapes(resolution=32, size=40)
    assert len(ds) == 40 and ds.resolution == 32
    assert ds.class_names == list(SHAPE_CLASSES) and ds.num_classes == 10 == len(SHAPE_CLASSES)
    for i in range(20):
        _check_item(ds[i], 32)
    image, _ = ds[0]
    assert image.std() > 0.1  # not a blank canvas
    with pytest.raises(IndexError):
        ds[40]


def test_synthetic_deterministic_and_splits_differ():
    a, b = SyntheticShapes(resolution=32, size=10), SyntheticShapes(resolution=32, size=10)
    assert torch.equal(a[3][0], a[3][0]) and torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], a[4][0])
    val = SyntheticShapes(resolution=32, size=10, split="val")
    test = SyntheticShapes(resolution=32, size=10, split="test")
    other_seed = SyntheticShapes(resolution=32, size=10, seed=1)
    for other in (val, test, other_seed):
        assert not any(torch.equal(a[i][0], other[i][0]) for i in range(10))


def test_synthetic_labels_balanced_and_fewer_classes():
    ds = SyntheticShapes(resolution=16, num_classes=4, size=100)
    counts = Counter(ds[i][1] for i in range(len(ds)))
    assert counts == {0: 25, 1: 25, 2: 25, 3: 25}
    assert ds.class_names == list(SHAPE_CLASSES[:4]) and ds.num_classes == 4


@pytest.mark.parametrize("resolution", [16, 64, 256])
def test_synthetic_resolutions(resolution):
    ds = SyntheticShapes(resolution=resolution, size=4)
    for i in range(2):
        _check_item(ds[i], resolution)


@pytest.mark.parametrize("resolution", [15, 300])
def test_synthetic_bad_resolution(resolution):
    with pytest.raises(ValueError, match=str(resolution)):
        SyntheticShapes(resolution=resolution)


# ---- folder ----

def _write_odd_images(directory: Path, color: tuple[int, int, int]) -> None:
    """One file per awkward format, plus two broken ones."""
    directory.mkdir(parents=True)
    Image.new("L", (30, 20), 128).save(directory / "gray.png")
    Image.new("RGBA", (20, 30), (*color, 0)).save(directory / "transparent.png")
    Image.new("CMYK", (25, 25), (0, 255, 255, 0)).save(directory / "cmyk.jpg")
    Image.new("RGB", (24, 24), color).convert("P").save(directory / "palette.PNG")
    Image.fromarray((np.arange(40 * 20).reshape(20, 40) * 80).astype(np.uint16)).save(directory / "deep16.png")
    (directory / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (directory / "empty.jpg").write_bytes(b"")
    (directory / "notes.txt").write_text("not an image")


def test_folder_classes_formats_and_corrupt_files(tmp_path, caplog):
    _write_odd_images(tmp_path / "cats", (200, 30, 30))
    _write_odd_images(tmp_path / "dogs", (30, 30, 200))
    ds = ImageFolderDataset(tmp_path, resolution=16, val_fraction=0.0)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2 and ds.resolution == 16
    assert len(ds) == 14  # 7 image-extension files per class; notes.txt is not one
    with caplog.at_level(logging.WARNING, logger="data.folder"):
        items = [ds[i] for i in range(len(ds))]
    for item in items:
        _check_item(item, 16)
    assert sorted(Path(p).name for p in ds.skipped_files) == ["corrupt.png", "corrupt.png", "empty.jpg", "empty.jpg"]
    assert "corrupt.png" in caplog.text
    # a bad file is replaced by the next good one: labels still match the folder of what came back
    labels = [label for _, label in items]
    assert labels.count(0) >= 5 and labels.count(1) >= 5
    # the transparent image is composited on white, the CMYK one is red
    names = [p.name for p in ds.files]
    assert torch.allclose(items[names.index("transparent.png")][0], torch.ones(3, 16, 16))
    red = items[names.index("cmyk.jpg")][0].mean(dim=(1, 2))
    assert red[0] > 0.9 and red[1] < -0.8 and red[2] < -0.8


def test_folder_all_corrupt_raises(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"nope")
    ds = ImageFolderDataset(tmp_path, resolution=8, val_fraction=0.0)
    with pytest.raises(DataSourceError, match="failed to load"):
        ds[0]


def test_sixteen_bit_grayscale_is_rescaled(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "mid16.png")
    assert load_image(tmp_path / "white16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "mid16.png").getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    tensor = to_tensor(loaded, 16)  # resize 20x40 -> 16x32, crop the middle 16 rows
    assert tensor.shape == (3, 16, 16)
    top, bottom = tensor[:, 0].mean(dim=1), tensor[:, -1].mean(dim=1)
    assert top[0] > 0.8 and top[2] < -0.8       # red on top
    assert bottom[2] > 0.8 and bottom[0] < -0.8  # blue below


def test_flat_folder_unlabelled_and_hash_split(tmp_path):
    for i in range(40):
        Image.new("RGB", (12, 12), (i * 6, 0, 0)).save(tmp_path / f"img{i:02d}.png")
    train = ImageFolderDataset(tmp_path, resolution=8, split="train", val_fraction=0.5)
    val = ImageFolderDataset(tmp_path, resolution=8, split="val", val_fraction=0.5)
    test = ImageFolderDataset(tmp_path, resolution=8, split="test", val_fraction=0.5)
    assert train.class_names is None and train.num_classes is None
    _check_item(train[0], 8)
    assert train[0][1] == -1
    train_names, val_names = {p.name for p in train.files}, {p.name for p in val.files}
    assert train_names.isdisjoint(val_names) and len(train_names | val_names) == 40
    assert train_names and val_names and val.files == test.files
    again = ImageFolderDataset(tmp_path, resolution=8, split="val", val_fraction=0.5)
    assert again.files == val.files


def test_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "val" / "b").joinpath("0.png").unlink()
    train = ImageFolderDataset(tmp_path, resolution=8, split="train")
    val = ImageFolderDataset(tmp_path, resolution=8, split="val")
    test = ImageFolderDataset(tmp_path, resolution=8, split="test")  # no test/: falls back to val/
    assert len(train) == 6 and len(val) == 3 and test.files == val.files
    assert train.class_names == val.class_names == ["a", "b"]
    assert [val[i][1] for i in range(3)] == [0, 0, 1]


def test_empty_or_missing_folder_names_path(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataSourceError, match=str(root)) as info:
            ImageFolderDataset(root, resolution=8)
        assert ".png" in str(info.value)


# ---- specs ----

def test_parse_spec():
    assert parse_spec("synthetic:shapes") == ("synthetic", "shapes", {})
    assert parse_spec("synthetic:shapes?classes=4&size=100") == ("synthetic", "shapes", {"classes": "4", "size": "100"})
    assert parse_spec("folder:C:/data/imgs?val_fraction=0.1") == ("folder", "C:/data/imgs", {"val_fraction": "0.1"})
    assert parse_spec("hf:user/name:cfg@train") == ("hf", "user/name:cfg@train", {})


def test_build_dataset():
    ds = build_dataset("synthetic:shapes?classes=3&size=30", resolution=16, split="val", seed=2)
    assert len(ds) == 30 and ds.num_classes == 3 and ds.resolution == 16
    _check_item(ds[0], 16)
    assert len(build_dataset("synthetic:shapes", resolution=16)) == 20000
    assert len(build_dataset("synthetic:shapes", resolution=16, split="test")) == 1000
    assert data.build_dataset is build_dataset


def test_synthetic_difficulty_options():
    easy = build_dataset("synthetic:shapes?shape_size=0.6-0.9&textures=smooth&size=20", resolution=32)
    assert easy.shape_size == (0.6, 0.9) and easy.textures == "smooth"
    default = build_dataset("synthetic:shapes?size=20", resolution=32)
    assert default.shape_size == (0.35, 0.75) and default.textures == "all"
    # larger shapes cover more of the image: the fraction of pixels far from the background colour grows
    def shape_cover(ds) -> float:
        images = torch.stack([ds[i][0] for i in range(20)])
        corner = images[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)
        return ((images - corner).abs().amax(1) > 0.5).float().mean().item()
    assert shape_cover(easy) > 1.3 * shape_cover(default)
    plain = build_dataset("synthetic:shapes?textures=plain&size=4", resolution=32)[1][0]
    assert (plain[:, :3, :3] == plain[:, :1, :1]).all()  # one flat background colour
    centered = build_dataset("synthetic:shapes?layout=centered&textures=plain&size=10", resolution=32)
    coords = torch.arange(32, dtype=torch.float32) + 0.5
    for image, _ in (centered[i] for i in range(10)):  # the shape's centroid is near the image centre
        mask = (image - image[:, :1, :1]).abs().amax(0) > 0.3                # (32, 32) shape pixels
        cy, cx = (mask.sum(1) * coords).sum() / mask.sum(), (mask.sum(0) * coords).sum() / mask.sum()
        assert abs(cx - 16) < 6 and abs(cy - 16) < 6  # a crescent's mass sits ~5 px off its centre


def test_build_folder_spec(tmp_path):
    (tmp_path / "x").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "x" / "a.png")
    ds = build_dataset(f"folder:{tmp_path}?val_fraction=0", resolution=8)
    assert len(ds) == 1 and ds.class_names == ["x"]


@pytest.mark.parametrize("spec, expected", [
    ("shapes", "KIND:ARG"),
    ("synthetic:", "KIND:ARG"),
    (":shapes", "KIND:ARG"),
    ("synthetic:shapes?", "after '?'"),
    ("synthetic:shapes?classes", "key=value"),
    ("synthetic:shapes?size=1&size=2", "twice"),
    ("imagenet:train", "unknown kind 'imagenet'; available: synthetic:shapes"),
    ("hf:/nonexistent/dir", "does not exist"),
    ("wds:/nonexistent/shards-{000..009}.tar", "10 of 10 shard(s) do not exist"),
    ("synthetic:circles", "available: shapes"),
    ("synthetic:shapes?colour=red", "valid options: classes, size, shape_size, textures, layout"),
    ("synthetic:shapes?layout=grid", "free, centered"),
    ("synthetic:shapes?shape_size=0.9-0.5", "MIN-MAX"),
    ("synthetic:shapes?shape_size=big", "MIN-MAX"),
    ("synthetic:shapes?textures=busy", "all, smooth, plain"),
    ("synthetic:shapes?classes=11", "2..10"),
    ("synthetic:shapes?classes=1", "2..10"),
    ("synthetic:shapes?size=many", "integer"),
    ("synthetic:shapes?size=0", "integer >= 1"),
    ("folder:/nonexistent/dir", "/nonexistent/dir"),
    ("folder:/tmp?val_fraction=1.5", "[0, 1)"),
    ("folder:/tmp?val_fraction=abc", "[0, 1)"),
    ("folder:/tmp?fraction=0.1", "valid options: val_fraction"),
])
def test_bad_specs(spec, expected):
    with pytest.raises(DataSourceError) as info:
        build_dataset(spec, resolution=16)
    assert spec in str(info.value) and expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_split_and_resolution():
    with pytest.raises(DataSourceError, match="split must be one of train, val, test"):
        build_dataset("synthetic:shapes", resolution=16, split="validation")
    with pytest.raises(DataSourceError, match=r"synthetic:shapes.*300"):
        build_dataset("synthetic:shapes", resolution=300)


# ---- npz arrays (added with the cifar32 preset) ----

def test_npz_source(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(5) % 10)
    ds = build_dataset(f"npz:{tmp_path / 'a.npz'}?classes=cifar10", resolution=8)
    image, label = ds[3]
    assert len(ds) == 5 and label == 3 and ds.class_names[3] == "cat"
    assert torch.allclose((image + 1) * 127.5, torch.from_numpy(images[3]).permute(2, 0, 1).float(), atol=1e-3)
    assert build_dataset(f"npz:{tmp_path / 'a.npz'}", resolution=16)[0][0].shape == (3, 16, 16)
    np.savez(tmp_path / "b.npz", pixels=images)
    with pytest.raises(DataSourceError, match="expected an 'images' array"):
        build_dataset(f"npz:{tmp_path / 'b.npz'}", resolution=8)
    with pytest.raises(DataSourceError, match="does not exist"):
        build_dataset(f"npz:{tmp_path / 'c.npz'}", resolution=8)
