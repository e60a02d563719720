"""Data specs: one string names a dataset, `KIND:ARG[?key=value&key=value...]`.

    synthetic:shapes                      embedded procedural shapes, no download
    synthetic:shapes?classes=4&size=512   the first 4 shape classes, 512 images per split
    synthetic:shapes?shape_size=0.55-0.85&textures=smooth   larger shapes on smooth backgrounds
    folder:/data/imagenet?val_fraction=0.01
    npz:cifar10/train.npz?classes=cifar10  uint8 images (N, H, W, 3) + labels; every split reads it all
    hf:cifar10@train?image=img            a Hugging Face dataset: hub name, save_to_disk dir or image dir
    hf:user/name:config?streaming=1&shuffle=5000
    wds:/data/shards/train-{000000..000099}.tar   webdataset tar shards (local, http(s)://, pipe:)
    mix:folder:/data/real|folder:gen/?synthetic=0.3   real + generated images, 30% of each epoch synthetic

Options are read from the text after the LAST '?', and only when it is a `key=value&...` list
with identifier keys, so URLs may carry their own query string:
`wds:https://host/x-{0..9}.tar?X-Amz-Signature=abc` is all ARG. A URL whose own query looks like
options (`?token=abc`) must be followed by options or by a lone '?':
`wds:https://host/x.tar?token=abc?` (ARG is the URL, no options).

`mix:REAL|SYNTHETIC?synthetic=F` splits ARG on '|' into two specs, each with its own options, and
builds both like the mix itself (resolution, split, seed, transform, shuffle); the mix's options
follow the last '?', so `synthetic=` must end the spec even when the inner specs have options:
`mix:synthetic:shapes?size=64|folder:gen/?synthetic=0.5`. See `data.mix`.

Each kind is one builder function plus one entry in `SOURCES`; a builder parses its own options
with the `_*_option` helpers so unknown keys and bad values fail before any data is touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from data.arrays import NpzImages
from data.errors import DataSourceError
from data.folder import ImageFolderDataset
from data.hf import load_hf_images
from data.mix import mix_datasets
from data.synthetic import LAYOUTS, SHAPE_CLASSES, TEXTURES, SyntheticShapes
from data.transforms import TransformConfig
from data.wds import WdsImages, shuffle_buffer_size

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPEC_FORMAT = "KIND:ARG[?key=value&key=value...]"


def _error(spec: str, message: str) -> DataSourceError:
    return DataSourceError(f"data spec {spec!r}: {message}")


def _parse_options(query: str) -> list[tuple[str, str]] | None:
    """`key=value&...` with identifier keys -> pairs, else None (then the '?' is part of ARG)."""
    pairs = [item.partition("=") for item in query.split("&")]
    if all(eq and key.isidentifier() for key, eq, _ in pairs):
        return [(key, value) for key, _, value in pairs]
    return None


def _is_url(arg: str) -> bool:
    return "://" in arg or arg.startswith("pipe:")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split `KIND:ARG[?key=value&...]` into (kind, arg, options); checks syntax only, not
    whether the kind or options exist. ARG may contain ':' and, in URLs, '?' (see the module doc)."""
    if not isinstance(spec, str):
        raise DataSourceError(f"data spec must be a string of the form {SPEC_FORMAT}, got {spec!r}")
    text = spec.strip()
    kind, has_colon, rest = text.partition(":")
    head, has_query, query = rest.rpartition("?")
    if not has_query:
        head = rest
    pairs: list[tuple[str, str]] = []
    if has_query:
        parsed = _parse_options(query) if query else []
        if parsed is not None and (query or _is_url(head)):
            pairs = parsed  # a lone trailing '?' after a URL: "no options", the documented escape
        elif _is_url(head):
            head = rest  # the '?' starts the URL's own query string
        elif not query:
            raise _error(spec, f"nothing after '?'; expected key=value options ({SPEC_FORMAT})")
        else:
            bad = next(item for item in query.split("&")
                       if not (item.partition("=")[1] and item.partition("=")[0].isidentifier()))
            raise _error(spec, f"option {bad!r} is not of the form key=value")
    if not has_colon or not kind or not head:
        raise _error(spec, f"expected {SPEC_FORMAT}, e.g. 'synthetic:shapes' or 'folder:/path/to/images'; "
                           f"kinds: {', '.join(SOURCES)}")
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise _error(spec, f"option {key!r} given twice")
        options[key] = value
    return kind, head, options


def _check_keys(spec: str, kind: str, options: dict[str, str], allowed: tuple[str, ...], hint: str = "") -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _error(spec, f"unknown option(s) {', '.join(map(repr, unknown))} for kind {kind!r}; "
                           f"valid options: {', '.join(allowed) or 'none'}{hint}")


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


# ---- builders: (arg, options, request) -> Dataset ----

@dataclass(frozen=True)
class Request:
    """What `build_dataset` was asked for, handed to every builder."""
    spec: str
    resolution: int
    split: str
    seed: int
    transform: TransformConfig | None
    shuffle: bool | None  # iterable sources only; None: shuffle when split == "train"


def _bool_option(spec: str, options: dict[str, str], key: str, default: bool) -> bool:
    value = options.get(key)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise _error(spec, f"option {key}={value!r}: expected 1/0 (or true/false)")


def _build_synthetic(arg: str, options: dict[str, str], req: Request) -> Dataset:
    if arg != "shapes":
        raise _error(req.spec, f"unknown synthetic dataset {arg!r}; available: shapes")
    _check_keys(req.spec, "synthetic", options, ("classes", "size", "shape_size", "textures", "layout"))
    classes = _int_option(req.spec, options, "classes", len(SHAPE_CLASSES), 2, len(SHAPE_CLASSES))
    size = _int_option(req.spec, options, "size", 20000 if req.split == "train" else 1000, 1)
    shape_size = (0.35, 0.75)
    if "shape_size" in options:
        try:
            shape_size = tuple(float(v) for v in options["shape_size"].split("-"))
        except ValueError:
            shape_size = ()
        if len(shape_size) != 2 or not 0.1 <= shape_size[0] <= shape_size[1] <= 1.0:
            raise _error(req.spec, f"option shape_size={options['shape_size']!r}: expected MIN-MAX diameter "
                                   f"fractions with 0.1 <= MIN <= MAX <= 1, e.g. 0.55-0.85")
    textures = options.get("textures", "all")
    if textures not in TEXTURES:
        raise _error(req.spec, f"option textures={textures!r}: expected one of {', '.join(TEXTURES)}")
    layout = options.get("layout", "free")
    if layout not in LAYOUTS:
        raise _error(req.spec, f"option layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    return SyntheticShapes(resolution=req.resolution, num_classes=classes, size=size, split=req.split,
                           seed=req.seed, transform=req.transform, shape_size=shape_size, textures=textures,
                           layout=layout)


def _build_folder(arg: str, options: dict[str, str], req: Request) -> Dataset:
    _check_keys(req.spec, "folder", options, ("val_fraction",))
    val_fraction = _fraction_option(req.spec, options, "val_fraction", 0.02)
    return ImageFolderDataset(Path(arg), resolution=req.resolution, split=req.split, val_fraction=val_fraction,
                              seed=req.seed, transform=req.transform)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _build_npz(arg: str, options: dict[str, str], req: Request) -> Dataset:
    _check_keys(req.spec, "npz", options, ("classes",))
    names = options.get("classes")
    if names not in (None, "cifar10"):
        raise _error(req.spec, f"option classes={names!r}: expected 'cifar10' (or leave it out)")
    return NpzImages(Path(arg), resolution=req.resolution, class_names=list(CIFAR10_CLASSES) if names else None,
                     seed=req.seed, transform=req.transform)


def _shuffle_option(options: dict[str, str], req: Request) -> int | None:
    return _int_option(req.spec, options, "shuffle", 0, 0) if "shuffle" in options else None


def _build_hf(arg: str, options: dict[str, str], req: Request) -> Dataset:
    _check_keys(req.spec, "hf", options, ("image", "label", "streaming", "shuffle"))
    streaming = _bool_option(req.spec, options, "streaming", False)
    if "shuffle" in options and not streaming:
        raise _error(req.spec, "option shuffle=N is a streaming buffer size; it needs streaming=1 "
                               "(map-style datasets are shuffled by the DataLoader's sampler)")
    return load_hf_images(arg, spec=req.spec, resolution=req.resolution, split=req.split, seed=req.seed,
                          transform=req.transform, image_column=options.get("image"),
                          label_column=options.get("label"), streaming=streaming,
                          shuffle_buffer=shuffle_buffer_size(_shuffle_option(options, req), req.shuffle, req.split))


def _build_wds(arg: str, options: dict[str, str], req: Request) -> Dataset:
    _check_keys(req.spec, "wds", options, ("shuffle", "classes"),
                hint="; a URL whose own query looks like options must end with a lone '?'" if _is_url(arg) else "")
    classes = _int_option(req.spec, options, "classes", 0, 1) if "classes" in options else None
    return WdsImages(arg, resolution=req.resolution, split=req.split, seed=req.seed, transform=req.transform,
                     shuffle=req.shuffle, shuffle_buffer=_shuffle_option(options, req), num_classes=classes,
                     spec=req.spec)


MIX_EXAMPLE = "mix:synthetic:shapes?size=64|folder:gen/?synthetic=0.5"


def _build_mix(arg: str, options: dict[str, str], req: Request) -> Dataset:
    if "synthetic" not in options:
        read = f" (the options after the last '?' were read as {options})" if options else ""
        raise _error(req.spec, f"a mix needs the synthetic share, as the last option: mix:REAL|SYNTHETIC?synthetic=F "
                               f"with F in [0, 1); inner specs keep their own options before it, e.g. "
                               f"{MIX_EXAMPLE!r}{read}")
    _check_keys(req.spec, "mix", options, ("synthetic",))
    fraction = _fraction_option(req.spec, options, "synthetic", 0.0)
    specs = arg.split("|")
    if len(specs) != 2 or not all(part.strip() for part in specs):
        raise _error(req.spec, f"expected exactly two specs separated by '|' (REAL|SYNTHETIC), got {len(specs)} "
                               f"part(s) in {arg!r}, e.g. {MIX_EXAMPLE!r}")
    real, synthetic = (build_dataset(part, resolution=req.resolution, split=req.split, seed=req.seed,
                                     transform=req.transform, shuffle=req.shuffle) for part in specs)
    return mix_datasets(real, synthetic, fraction, seed=req.seed,
                        shuffle=req.shuffle if req.shuffle is not None else req.split == "train", spec=req.spec)


@dataclass(frozen=True)
class Source:
    build: Callable[[str, dict[str, str], Request], Dataset]
    usage: str  # shown when a spec is wrong


SOURCES: dict[str, Source] = {
    "synthetic": Source(_build_synthetic,
                        "synthetic:shapes[?classes=2..10&size=N&shape_size=MIN-MAX&textures=all|smooth|plain&layout=free|centered]"),
    "folder": Source(_build_folder, "folder:PATH[?val_fraction=0.02]"),
    "npz": Source(_build_npz, "npz:FILE.npz[?classes=cifar10] (uint8 'images' (N,H,W,3), optional 'labels')"),
    "hf": Source(_build_hf, "hf:NAME[:CONFIG][@SPLIT] or hf:DIR[@SPLIT] (Hugging Face datasets)"
                            "[?image=COL&label=COL&streaming=1&shuffle=N]"),
    "wds": Source(_build_wds, "wds:URLS (webdataset tar shards, e.g. /data/train-{000000..000099}.tar)"
                              "[?shuffle=N&classes=N]"),
    "mix": Source(_build_mix, "mix:REAL_SPEC|SYNTHETIC_SPEC?synthetic=F (F in [0, 1): the synthetic share "
                              "of each epoch; the mix's option comes last, after any inner options)"),
}


def build_dataset(spec: str, *, resolution: int, split: str = "train", seed: int = 0,
                  transform: TransformConfig | None = None, shuffle: bool | None = None,
                  require_labels: bool = False) -> Dataset:
    """Build the dataset a spec names; items are `(image (3, R, R) float32 in [-1, 1], label int
    or -1)`, and the dataset has `class_names`, `num_classes`, `resolution`, `set_epoch(epoch)`,
    `skipped_files` and `skip_log`.

    Map-style for synthetic/folder/npz/hf (shuffling is the sampler's job); a
    `torch.utils.data.IterableDataset` for wds and hf with streaming=1, which split their data by
    rank and DataLoader worker themselves and shuffle when `shuffle` (None: when split == "train");
    mix is map-style when both of its sources are.
    `transform` adds seeded random crops/flips; `require_labels` rejects unlabelled sources."""
    kind, arg, options = parse_spec(spec)
    if split not in SPLITS:
        raise _error(spec, f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise _error(spec, f"resolution must be a positive integer, got {resolution!r}")
    if transform is not None and not isinstance(transform, TransformConfig):
        raise _error(spec, f"transform must be a data.TransformConfig or None, got {transform!r}")
    if kind not in SOURCES:
        raise _error(spec, f"unknown kind {kind!r}; available: {'; '.join(s.usage for s in SOURCES.values())}")
    request = Request(spec, resolution, split, seed, transform, shuffle)
    try:
        dataset = SOURCES[kind].build(arg, options, request)
    except ValueError as e:  # a dataset's own check (resolution range, missing folder): add the spec
        if str(e).startswith(f"data spec {spec!r}"):
            raise
        raise _error(spec, str(e)) from e
    if require_labels and getattr(dataset, "num_classes", None) is None:
        columns = getattr(dataset, "columns", None)
        raise _error(spec, "this source has no labels, but class-conditional training needs labels "
                           "(a folder with one sub-folder per class, an npz 'labels' array, an HF "
                           "ClassLabel column or label=COL, wds 'cls' entries with a manifest or ?classes=N)"
                           + (f"; columns: {', '.join(columns)}" if columns else ""))
    return dataset
