"""Tests for mixing real and synthetic sources (`mix:` specs, `data.mix`) and `classes.json` in
image folders. Real images are solid squares whose pixel encodes their id; synthetic ones are shapes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from data import (SHAPE_CLASSES, DataSourceError, ImageFolderDataset, MixedImages, MixedStream, SyntheticShapes,
                  build_dataset, pack_dataset)

RES = 16  # SyntheticShapes' smallest size; folder images are made at it so they are never resized


def _solid(i: int) -> Image.Image:
    """A RES x RES image of one colour (i % 256, i // 256, 77): its id survives PNG exactly."""
    return Image.fromarray(np.full((RES, RES, 3), (i % 256, i // 256, 77), dtype=np.uint8))


def _ident(image: torch.Tensor) -> int | None:
    """The id of a `_solid` image, or None for anything not of one colour (a synthetic shape)."""
    if not torch.equal(image, image[:, :1, :1].expand_as(image)):
        return None
    p = ((image[:, 0, 0] + 1) * 127.5).round().to(torch.int64)
    return int(p[0]) + 256 * int(p[1])


def _folder(root: Path, classes: list[str], per_class: int, first: int = 0) -> Path:
    """root/<class>/<id>.png solid images, ids first.. in class order."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            i = first + c * per_class + k
            _solid(i).save(root / name / f"{i:03d}.png")
    return root


def _real_spec(root: Path) -> str:
    return f"folder:{root}?val_fraction=0"


# ---- map-style ----

def test_spec_with_inner_options_and_synthetic_share(tmp_path):
    real_dir = _folder(tmp_path / "real", list(SHAPE_CLASSES[:2]), 10)
    spec = f"mix:{_real_spec(real_dir)}|synthetic:shapes?classes=2&size=40?synthetic=0.3"
    mix = build_dataset(spec, resolution=RES)
    real = build_dataset(_real_spec(real_dir), resolution=RES)
    synthetic = build_dataset("synthetic:shapes?classes=2&size=40", resolution=RES)
    assert isinstance(mix, MixedImages) and len(synthetic) == 40  # both inner option lists were applied
    assert len(mix) == 20 + round(20 * 0.3 / 0.7) == 29 and mix.resolution == RES
    assert mix.class_names == real.class_names == list(SHAPE_CLASSES[:2]) and mix.num_classes == 2
    sides = Counter(mix.locate(i)[0] for i in range(len(mix)))
    assert sides == {"real": 20, "synthetic": 9}
    for i in range(len(mix)):
        image, label = mix[i]
        side, j = mix.locate(i)
        expected_image, expected_label = (real if side == "real" else synthetic)[j]
        assert torch.equal(image, expected_image) and label == expected_label and type(label) is int
        assert (side == "real") == (_ident(image) is not None) and (side != "real" or j == i)

    for fraction in (0.0, 0.1, 0.5, 0.9):
        share = MixedImages(real, synthetic, fraction).num_synthetic / len(MixedImages(real, synthetic, fraction))
        assert abs(share - fraction) <= 1 / 20


def test_epochs_pick_different_synthetic_items_reproducibly():
    real, synthetic = SyntheticShapes(RES, 2, size=10), SyntheticShapes(RES, 2, size=40, split="val")

    def picks(seed: int, epoch: int) -> list[int]:
        mix = MixedImages(real, synthetic, 0.5, seed=seed)
        mix.set_epoch(epoch)
        return [mix.locate(i)[1] for i in range(10, len(mix))]

    assert len(picks(0, 0)) == 10 and len(set(picks(0, 0))) == 10  # no repeats while the set is larger
    assert picks(0, 0) == picks(0, 0) and picks(0, 1) == picks(0, 1)
    assert picks(0, 0) != picks(0, 1) and picks(0, 0) != picks(1, 0)

    small = MixedImages(real, SyntheticShapes(RES, 2, size=3), 0.5, seed=0)  # 10 picks from 3: cycles
    chosen = [small.locate(i)[1] for i in range(10, 20)]
    assert sorted(chosen[:3]) == [0, 1, 2] and set(Counter(chosen).values()) <= {3, 4}


def test_skip_channel_and_epoch_pass_through(tmp_path):
    real_dir = _folder(tmp_path / "real", list(SHAPE_CLASSES[:2]), 3)
    (real_dir / "circle" / "bad.png").write_bytes(b"not a png")
    mix = build_dataset(f"mix:{_real_spec(real_dir)}|synthetic:shapes?classes=2&size=5?synthetic=0.5", resolution=RES)
    mix.skip_log = tmp_path / "skips"
    assert mix.real.skip_log == mix.synthetic.skip_log == tmp_path / "skips"
    for i in range(len(mix)):
        mix[i]
    assert [Path(p).name for p in mix.skipped_files] == ["bad.png"]
    mix.set_epoch(3)
    assert mix.epoch == 3 and mix.real._augment.epoch == 3 and mix.synthetic._augment.epoch == 3


# ---- classes.json ----

def test_classes_json_orders_folder_class_ids(tmp_path):
    root = _folder(tmp_path / "gen", ["a", "b", "c"], 2)
    assert ImageFolderDataset(root, RES, val_fraction=0).class_names == ["a", "b", "c"]  # sorted without it
    (root / "classes.json").write_text(json.dumps(["c", "a", "b", "d"]))
    ds = ImageFolderDataset(root, RES, val_fraction=0)
    assert ds.class_names == ["c", "a", "b", "d"] and ds.num_classes == 4  # a listed class may have no images
    assert {Path(f).parent.name: label for f, label in zip(ds.files, ds.labels)} == {"c": 0, "a": 1, "b": 2}

    # the intended use: a generated folder takes the prior's class ids, so it mixes with the real data
    shapes = list(SHAPE_CLASSES[:4])
    gen = _folder(tmp_path / "shapes", shapes, 2)
    mix_spec = f"mix:synthetic:shapes?classes=4&size=8|{_real_spec(gen)}?synthetic=0.5"
    differ = r"class names differ: real \['circle', 'square'.*synthetic \['circle', 'diamond'"
    with pytest.raises(DataSourceError, match=differ):
        build_dataset(mix_spec, resolution=RES)
    (gen / "classes.json").write_text(json.dumps(shapes))
    mix = build_dataset(mix_spec, resolution=RES)
    assert mix.class_names == shapes
    generated = mix.synthetic
    assert all(label == shapes.index(Path(f).parent.name) for f, label in zip(generated.files, generated.labels))


@pytest.mark.parametrize("content, message", [
    (["a"], r"sub-folder\(s\) 'b' are not listed"),
    ("{not json", "cannot be read"),
    ({"a": 0}, "expected a JSON list of unique"),
    (["a", "b", "a"], "expected a JSON list of unique"),
    (["a", 3], "expected a JSON list of unique"),
])
def test_classes_json_errors(tmp_path, content, message):
    root = _folder(tmp_path / "gen", ["a", "b"], 1)
    (root / "classes.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataSourceError, match=message) as info:
        ImageFolderDataset(root, RES, val_fraction=0)
    assert str(root / "classes.json") in str(info.value)


def test_classes_json_in_unlabelled_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    _solid(0).save(tmp_path / "flat" / "0.png")
    (tmp_path / "flat" / "classes.json").write_text('["a"]')
    with pytest.raises(DataSourceError, match="no class sub-folders"):
        build_dataset(f"folder:{tmp_path / 'flat'}?val_fraction=0", resolution=RES)


# ---- errors ----

def test_mix_errors(tmp_path):
    real_dir = _folder(tmp_path / "real", ["a", "b"], 2)
    flat = tmp_path / "flat"
    flat.mkdir()
    _solid(0).save(flat / "0.png")
    shapes2 = "synthetic:shapes?classes=2&size=4"

    def fails(spec: str, pattern: str) -> str:
        with pytest.raises(DataSourceError, match=pattern) as info:
            build_dataset(spec, resolution=RES)
        assert str(info.value).startswith(f"data spec {spec!r}")
        return str(info.value)

    for bad in ("1", "1.5", "-0.1", "nan", "x"):
        fails(f"mix:{shapes2}|{shapes2}?synthetic={bad}", r"expected a number in \[0, 1\)")
    message = fails(f"mix:{shapes2}|synthetic:shapes?size=4", r"synthetic=F")  # the inner options ate the '?'
    assert "mix:synthetic:shapes?size=64|folder:gen/?synthetic=0.5" in message and "{'size': '4'}" in message
    fails(f"mix:{shapes2}|{shapes2}?synthetic=0.5&seed=3", "unknown option.*'seed'.*valid options: synthetic")
    fails(f"mix:{shapes2}?synthetic=0.5", "exactly two specs.*got 1")
    fails(f"mix:{shapes2}|{shapes2}|{shapes2}?synthetic=0.5", "exactly two specs.*got 3")
    fails(f"mix:{shapes2}|?synthetic=0.5", "exactly two specs")
    fails(f"mix:folder:{flat}|{shapes2}?synthetic=0.5", "synthetic source is labelled but the real one is not")
    fails(f"mix:{shapes2}|folder:{flat}?synthetic=0.5", "real source is labelled but the synthetic one is not")
    fails(f"mix:{shapes2}|synthetic:shapes?classes=3&size=4?synthetic=0.5", "2 classes but the synthetic one 3")
    fails(f"mix:{_real_spec(real_dir)}|{shapes2}?synthetic=0.5",
          r"class names differ: real \['a', 'b'\], synthetic \['circle', 'square'\]")
    fails(f"mix:folder:{tmp_path / 'missing'}|{shapes2}?synthetic=0.5", "does not exist")
    with pytest.raises(DataSourceError, match="16 px but the synthetic one 32 px"):
        MixedImages(SyntheticShapes(16, 2, size=4), SyntheticShapes(32, 2, size=4), 0.5)
    with pytest.raises(DataSourceError, match=r"in \[0, 1\)"):
        MixedImages(SyntheticShapes(16, 2, size=4), SyntheticShapes(16, 2, size=4), 1.0)
    # unlabelled + unlabelled is fine; labels stay -1
    assert build_dataset(f"mix:folder:{flat}|folder:{flat}?synthetic=0.5", resolution=RES)[1][1] == -1


# ---- iterable ----

def _pack(tmp_path: Path, folder: Path, name: str, shard_size: int) -> str:
    manifest = pack_dataset(_real_spec(folder), tmp_path / name, shard_size=shard_size, progress=False)
    last = len(manifest["shards"]) - 1
    return f"wds:{tmp_path / name}/shard-{{000000..{last:06d}}}.tar"


def test_stream_mix_share_and_reproducibility(tmp_path):
    real_dir = _folder(tmp_path / "real", list(SHAPE_CLASSES[:2]), 30)
    wds_spec = _pack(tmp_path, real_dir, "packed", shard_size=16)
    mix = build_dataset(f"mix:{wds_spec}|synthetic:shapes?classes=2&size=12?synthetic=0.4", resolution=RES)
    assert isinstance(mix, MixedStream) and isinstance(mix, IterableDataset)
    assert mix.class_names == list(SHAPE_CLASSES[:2]) and mix.num_classes == 2

    def epoch(e: int) -> list[int | None]:
        mix.set_epoch(e)
        return [_ident(image) for image, _ in mix]

    items = epoch(0)
    real_ids = [i for i in items if i is not None]
    assert sorted(real_ids) == list(range(60))  # every real item once, the epoch ends with them
    share = items.count(None) / len(items)
    assert 0.25 < share < 0.55, share  # 0.4 in expectation
    assert epoch(0) == items and epoch(1) != items
    labels = {i: label for (image, label) in mix for i in [_ident(image)] if i is not None}
    assert all(label == i // 30 for i, label in labels.items())


def test_stream_mix_restarts_synthetic_and_splits_workers(tmp_path):
    real_dir = _folder(tmp_path / "real", ["a", "b"], 10)
    syn_wds = _pack(tmp_path, _folder(tmp_path / "gen", ["a", "b"], 1, first=100), "gen-packed", shard_size=1)
    mix = build_dataset(f"mix:{_real_spec(real_dir)}|{syn_wds}?synthetic=0.5", resolution=RES)
    assert isinstance(mix, MixedStream) and mix.class_names == ["a", "b"]  # a map-style real side, split here

    def split(ids: list[int]) -> tuple[list[int], Counter]:
        return sorted(i for i in ids if i < 100), Counter(i for i in ids if i >= 100)

    mix.set_epoch(0)
    real, synthetic = split([_ident(image) for image, _ in mix])
    assert real == list(range(20)) and set(synthetic) == {100, 101}
    assert sum(synthetic.values()) > 4  # the 2 generated images are drawn again and again
    # two DataLoader workers: each reads half the real items and one of the two synthetic shards
    real, synthetic = split([_ident(image) for image, _ in DataLoader(mix, batch_size=None, num_workers=2)])
    assert real == list(range(20)) and set(synthetic) == {100, 101}
