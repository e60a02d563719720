"""Data specs: one string names a dataset, `KIND:ARG[?key=value&key=value...]`.

    synthetic:shapes                      embedded procedural shapes, no download
    synthetic:shapes?classes=4&size=512   the first 4 shape classes, 512 images per split
    folder:/data/imagenet?val_fraction=0.01
    npz:cifar10/train.npz?classes=cifar10  uint8 images (N, H, W, 3) + labels; every split reads it all

Each kind is one builder function plus one entry in `SOURCES`; a builder parses its own options
with the `_*_option` helpers so unknown keys and bad values fail before any data is touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from data.arrays import NpzImages
from data.errors import DataSourceError
from data.folder import ImageFolderDataset
from data.synthetic import SHAPE_CLASSES, SyntheticShapes

SPLITS = ("train", "val", "test")
SPEC_FORMAT = "KIND:ARG[?key=value&key=value...]"


def _error(spec: str, message: str) -> DataSourceError:
    return DataSourceError(f"data spec {spec!r}: {message}")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split `KIND:ARG[?key=value&...]` into (kind, arg, options); checks syntax only, not
    whether the kind or options exist. ARG may itself contain ':' (everything up to '?')."""
    if not isinstance(spec, str):
        raise DataSourceError(f"data spec must be a string of the form {SPEC_FORMAT}, got {spec!r}")
    head, has_query, query = spec.strip().partition("?")
    kind, has_colon, arg = head.partition(":")
    if not has_colon or not kind or not arg:
        raise _error(spec, f"expected {SPEC_FORMAT}, e.g. 'synthetic:shapes' or 'folder:/path/to/images'; "
                           f"kinds: {', '.join(SOURCES)}")
    options: dict[str, str] = {}
    if has_query:
        if not query:
            raise _error(spec, f"nothing after '?'; expected key=value options ({SPEC_FORMAT})")
        for item in query.split("&"):
            key, has_eq, value = item.partition("=")
            if not has_eq or not key:
                raise _error(spec, f"option {item!r} is not of the form key=value")
            if key in options:
                raise _error(spec, f"option {key!r} given twice")
            options[key] = value
    return kind, arg, options


def _check_keys(spec: str, kind: str, options: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _error(spec, f"unknown option(s) {', '.join(map(repr, unknown))} for kind {kind!r}; "
                           f"valid options: {', '.join(allowed) or 'none'}")


def _int_option(spec: str, options: dict[str, str], key: str, default: int,
                low: int, high: int | None = None) -> int:
    if key not in options:
        return default
    expected = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    try:
        value = int(options[key])
    except ValueError:
        raise _error(spec, f"option {key}={options[key]!r}: expected {expected}") from None
    if value < low or (high is not None and value > high):
        raise _error(spec, f"option {key}={value}: expected {expected}")
    return value


def _fraction_option(spec: str, options: dict[str, str], key: str, default: float) -> float:
    """A float in [0, 1)."""
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        raise _error(spec, f"option {key}={options[key]!r}: expected a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise _error(spec, f"option {key}={options[key]}: expected a number in [0, 1)")
    return value


# ---- builders: (spec, arg, options, resolution, split, seed) -> Dataset ----

def _build_synthetic(spec: str, arg: str, options: dict[str, str], resolution: int, split: str, seed: int) -> Dataset:
    if arg != "shapes":
        raise _error(spec, f"unknown synthetic dataset {arg!r}; available: shapes")
    _check_keys(spec, "synthetic", options, ("classes", "size"))
    classes = _int_option(spec, options, "classes", len(SHAPE_CLASSES), 2, len(SHAPE_CLASSES))
    size = _int_option(spec, options, "size", 20000 if split == "train" else 1000, 1)
    return SyntheticShapes(resolution=resolution, num_classes=classes, size=size, split=split, seed=seed)


def _build_folder(spec: str, arg: str, options: dict[str, str], resolution: int, split: str, seed: int) -> Dataset:
    _check_keys(spec, "folder", options, ("val_fraction",))
    val_fraction = _fraction_option(spec, options, "val_fraction", 0.02)
    return ImageFolderDataset(Path(arg), resolution=resolution, split=split, val_fraction=val_fraction, seed=seed)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _build_npz(spec: str, arg: str, options: dict[str, str], resolution: int, split: str, seed: int) -> Dataset:
    _check_keys(spec, "npz", options, ("classes",))
    names = options.get("classes")
    if names not in (None, "cifar10"):
        raise _error(spec, f"option classes={names!r}: expected 'cifar10' (or leave it out)")
    return NpzImages(Path(arg), resolution=resolution, class_names=list(CIFAR10_CLASSES) if names else None)


@dataclass(frozen=True)
class Source:
    build: Callable[[str, str, dict[str, str], int, str, int], Dataset]
    usage: str  # shown when a spec is wrong


SOURCES: dict[str, Source] = {
    "synthetic": Source(_build_synthetic, "synthetic:shapes[?classes=2..10&size=N]"),
    "folder": Source(_build_folder, "folder:PATH[?val_fraction=0.02]"),
    "npz": Source(_build_npz, "npz:FILE.npz[?classes=cifar10] (uint8 'images' (N,H,W,3), optional 'labels')"),
}
# named in the design, not built yet: a clear error instead of "unknown kind"
PLANNED: dict[str, str] = {
    "hf": "hf:NAME[:CONFIG][@SPLIT] (Hugging Face datasets)",
    "wds": "wds:URLS (WebDataset shards)",
}


def build_dataset(spec: str, *, resolution: int, split: str = "train", seed: int = 0) -> Dataset:
    """Build the map-style dataset a spec names; items are `(image (3, R, R) float32 in [-1, 1],
    label int or -1)`, and the dataset has `class_names`, `num_classes` and `resolution`."""
    kind, arg, options = parse_spec(spec)
    if split not in SPLITS:
        raise _error(spec, f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise _error(spec, f"resolution must be a positive integer, got {resolution!r}")
    if kind in PLANNED:
        raise _error(spec, f"kind {kind!r} ({PLANNED[kind]}) is not available yet; "
                           f"available: {'; '.join(s.usage for s in SOURCES.values())}")
    if kind not in SOURCES:
        raise _error(spec, f"unknown kind {kind!r}; available: {'; '.join(s.usage for s in SOURCES.values())}")
    try:
        return SOURCES[kind].build(spec, arg, options, resolution, split, seed)
    except ValueError as e:  # a dataset's own check (resolution range, missing folder): add the spec
        if str(e).startswith(f"data spec {spec!r}"):
            raise
        raise _error(spec, str(e)) from e
