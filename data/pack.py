"""`vqgan data pack`: turn any data spec into webdataset tar shards plus a manifest.

    out_dir/shard-000000.tar   KEY.png (or .jpg), KEY.cls (label; absent when -1), KEY.json (metadata)
    out_dir/manifest.json      source, options, counts, class names, skipped files, shard sha256s

Resumable and reproducible: a shard is written under a temporary name and renamed when complete,
then the manifest is rewritten atomically. A rerun verifies the listed shards, deletes partial or
unlisted ones and continues from the next source item. Tar entries carry no time, owner or
permission information, so a killed-and-rerun pack is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from PIL import Image
from torch.utils.data import IterableDataset
from tqdm import tqdm

from common import atomic_write_json, sha256_file
from data.errors import DataSourceError, record_skip
from data.sources import build_dataset, parse_spec
from data.transforms import resize_crop
from data.wds import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, read_manifest

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": ("png", {}), "jpg": ("jpeg", {"quality": 95})}
OPTION_KEYS = ("source", "split", "resolution", "image_format", "shard_size", "seed")
PLACEHOLDER_RESOLUTION = 256  # sources are built at some size, but pack reads their native-size images


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _encode(image: Image.Image, image_format: str) -> bytes:
    pil_format, params = IMAGE_FORMATS[image_format]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **params)
    return buffer.getvalue()


def write_shard(path: Path, entries: list[tuple[str, bytes]]) -> None:
    """Write `entries` (name, data) as a tar at `path` via `path.tmp`; every header field that could
    vary between runs (mtime, owner, mode) is fixed, so equal entries give a byte-identical tar."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_write_shard = write_shard  # the old private name; pack_dataset calls it through this alias


def _item_name(dataset: Any, index: int) -> str:
    files = getattr(dataset, "files", None)
    return str(files[index]) if files is not None else f"item {index}"


class _Item(NamedTuple):
    index: int
    image: Image.Image | None  # None: unreadable, or the end marker
    label: int
    name: str | None
    skips: list[str]  # files the source skipped while this item was fetched
    end: bool = False


def _items(dataset: Any, start: int) -> Iterator[_Item]:
    """Every source item from index `start` in natural order, then an end marker whose index is the
    number of items and whose skips are those recorded after the last item."""
    seen = len(dataset.skipped_files)

    def new_skips() -> list[str]:
        nonlocal seen
        found, seen = dataset.skipped_files[seen:], len(dataset.skipped_files)
        return list(found)

    if isinstance(dataset, IterableDataset):
        end = 0
        for index, (image, label, name) in enumerate(dataset.iter_pil()):
            if isinstance(image, Exception):
                record_skip(dataset, name or f"item {index}", f"{type(image).__name__}: {image}")
                image = None
            skips, end = new_skips(), index + 1
            if index >= start:  # earlier items (and their skips) are in the shards already written
                yield _Item(index, image, label, name, skips)
    else:
        end = len(dataset)
        for index in range(start, end):
            try:
                image, label, name = dataset.pil_item(index)
            except Exception as e:  # a corrupt file: skipped and counted, never fatal
                record_skip(dataset, _item_name(dataset, index), f"{type(e).__name__}: {e}")
                image, label, name = None, -1, None
            yield _Item(index, image, label, name, new_skips())
    yield _Item(max(end, start), None, -1, None, new_skips(), end=True)


def _verified_shards(out: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The longest prefix of the manifest's shards whose files exist with the recorded sha256."""
    good = []
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            logger.warning("pack %s: shard %s is missing or does not match its sha256; rewriting from it",
                           out, shard["name"])
            break
        good.append(shard)
    return good


def pack_dataset(spec: str, out_dir: str | Path, *, shard_size: int = 1000, resolution: int | None = None,
                 image_format: str = "png", split: str = "train", seed: int = 0, progress: bool = True) -> dict:
    """Write the `split` of `spec` as webdataset shards of `shard_size` samples in `out_dir`, images
    resized and centre-cropped to `resolution` (None: native size; synthetic sources need one).
    Resumes a previous run with the same options; returns the manifest."""
    kind, _, _ = parse_spec(spec)
    if image_format not in IMAGE_FORMATS:
        raise DataSourceError(f"pack {spec!r}: image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataSourceError(f"pack {spec!r}: shard_size must be a positive integer, got {shard_size!r}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise DataSourceError(f"pack {spec!r}: resolution must be a positive integer or None, got {resolution!r}")
    if resolution is None and kind == "synthetic":
        raise DataSourceError(f"pack {spec!r}: a synthetic source has no native image size; pass a resolution")

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    options = {"source": spec, "split": split, "resolution": resolution, "image_format": image_format,
               "shard_size": shard_size, "seed": seed}
    previous = read_manifest(out)
    if previous is not None:
        different = {k: previous.get(k) for k in OPTION_KEYS if previous.get(k) != options[k]}
        if different:
            raise DataSourceError(
                f"pack {spec!r}: {str(out)!r} already holds a pack made with other options "
                f"({', '.join(f'{k}={v!r}, now {options[k]!r}' for k, v in different.items())}); "
                f"use another directory or delete this one")
    shards = _verified_shards(out, previous) if previous else []
    listed = {s["name"] for s in shards}
    for path in sorted(out.glob("shard-*.tar*")):  # partial, temporary or unlisted: written again below
        if path.name not in listed:
            path.unlink()
    if previous is not None and previous.get("complete") and len(shards) == len(previous["shards"]):
        return previous

    dataset = build_dataset(spec, resolution=resolution or PLACEHOLDER_RESOLUTION, split=split, seed=seed,
                            shuffle=False)
    class_names = dataset.class_names
    next_index = shards[-1]["next_index"] if shards else 0
    skipped = [s for s in (previous or {}).get("skipped_files", []) if s["index"] < next_index]
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **options, "complete": False,
                "count": 0, "class_names": class_names, "num_classes": dataset.num_classes,
                "skipped": 0, "skipped_files": skipped, "next_index": next_index, "shards": shards}

    def save(complete: bool) -> None:
        manifest.update(complete=complete, count=sum(s["count"] for s in shards),
                        skipped=len(skipped), next_index=next_index)
        atomic_write_json(out / MANIFEST_NAME, manifest)

    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, initial=next_index, unit="img", desc=f"pack {spec}", disable=not progress)
    entries: list[tuple[str, bytes]] = []
    count, first_index = 0, next_index
    for item in _items(dataset, next_index):
        skipped.extend({"index": item.index, "file": f} for f in item.skips)
        if item.end:
            next_index = item.index
            break
        bar.update(1)
        if item.image is None:
            continue
        image = resize_crop(item.image, resolution) if resolution is not None else item.image
        label, names = item.label, class_names
        meta = {"index": item.index, "label": label, "source": spec, "file": item.name,
                "class_name": names[label] if names and 0 <= label < len(names) else None}
        key = f"{item.index:09d}"
        sample = [(f"{key}.{image_format}", _encode(image, image_format)),
                  (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))]
        if label >= 0:
            sample.append((f"{key}.cls", str(label).encode("ascii")))
        entries.extend(sorted(sample))
        count += 1
        if count == shard_size:
            next_index = item.index + 1
            shards.append(_finish_shard(out, len(shards), entries, count, first_index, next_index))
            save(complete=False)
            entries, count, first_index = [], 0, next_index
    if count:
        shards.append(_finish_shard(out, len(shards), entries, count, first_index, next_index))
    bar.close()
    save(complete=True)
    if manifest["count"] == 0:
        raise DataSourceError(f"pack {spec!r}: no readable images ({len(skipped)} skipped)")
    return manifest


def _finish_shard(out: Path, number: int, entries: list[tuple[str, bytes]], count: int,
                  first_index: int, next_index: int) -> dict[str, Any]:
    path = out / shard_name(number)
    _write_shard(path, entries)
    return {"name": path.name, "count": count, "sha256": sha256_file(path),
            "first_index": first_index, "next_index": next_index}
