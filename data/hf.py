"""Hugging Face datasets as image datasets: `hf:NAME[:CONFIG][@SPLIT]`, or `hf:DIR[@SPLIT]` for a
directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` or a plain directory of
images (read with the `imagefolder` builder).

Our splits map to HF split names: train -> train, val -> validation (else val, valid, test, said
in a log line), test -> test; `@SPLIT` picks one by its HF name. The image column is `image=COL`
or the first `datasets.Image` feature or a column named image/img/png/jpg; the label column is
`label=COL` or the first `ClassLabel` feature or a column named label/labels/class. Images are
decoded here, not by `datasets`, so bad bytes are skipped and recorded instead of raising.
`datasets` is imported only when an hf source is built (it takes about a second).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data.errors import DataSourceError, load_or_next, record_skip
from data.transforms import IMAGE_EXTENSIONS, SeededTransform, TransformConfig, decode_image, load_image, to_rgb

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "test"), "test": ("test",)}
IMAGE_COLUMN_NAMES = ("image", "img", "png", "jpg")
LABEL_COLUMN_NAMES = ("label", "labels", "class")
MAX_STREAM_SHARDS = 64  # a saved dataset streamed from disk is cut into this many shards for workers/ranks


def to_pil(value: Any) -> tuple[Image.Image, str | None]:
    """An image as `datasets` hands it over (PIL image, {"bytes", "path"} dict, raw bytes, a file
    path, an array) -> (RGB PIL image, original file name or None). Raises on undecodable data."""
    if isinstance(value, Image.Image):
        value.load()
        return to_rgb(value), getattr(value, "filename", None) or None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return decode_image(bytes(data)), path
        if path:
            return load_image(path), path
        raise ValueError("image entry has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value)), None
    if isinstance(value, str):
        return load_image(value), value
    if isinstance(value, np.ndarray):
        return to_rgb(Image.fromarray(value)), None
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def _error(spec: str, message: str) -> DataSourceError:
    return DataSourceError(f"data spec {spec!r}: {message}")


def _choose_split(available: Sequence[str], split: str, override: str | None, spec: str) -> str:
    if override is not None:
        if override not in available:
            raise _error(spec, f"split {override!r} does not exist; available splits: {', '.join(available)}")
        return override
    for name in SPLIT_NAMES[split]:
        if name in available:
            if split == "val" and name != "validation":
                logger.warning("%s: no 'validation' split; split 'val' reads the HF split %r", spec, name)
            return name
    raise _error(spec, f"no split for {split!r} (looked for {', '.join(SPLIT_NAMES[split])}); available "
                       f"splits: {', '.join(available)}; name one with @SPLIT")


def _open(arg: str, spec: str, split: str, streaming: bool) -> Any:
    """The `datasets.Dataset` / `IterableDataset` an hf: ARG names for our `split`."""
    import datasets

    path, override = Path(arg).expanduser(), None
    if not path.exists() and "@" in arg:
        base, _, override = arg.rpartition("@")
        path = Path(base).expanduser()
    else:
        base = arg
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                chosen = loaded[_choose_split(list(loaded), split, override, spec)]
            else:
                if override is not None:
                    raise _error(spec, f"{str(path)!r} holds one saved Dataset, not a DatasetDict: it has no splits "
                                       f"to pick with @{override}")
                logger.info("%s: a saved Dataset without splits; every split reads all of it", spec)
                chosen = loaded
            if streaming:
                chosen = chosen.to_iterable_dataset(num_shards=max(1, min(MAX_STREAM_SHARDS, len(chosen))))
            return chosen
        if path.is_dir() and next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), None):
            available = datasets.get_dataset_split_names("imagefolder", data_dir=str(path))
            name = _choose_split(available, split, override, spec)
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=name, streaming=streaming)
        if path.is_dir():  # a local dataset repository (parquet, arrow, csv, ... files): the hub loader reads it
            available = datasets.get_dataset_split_names(str(path))
            return datasets.load_dataset(str(path), split=_choose_split(available, split, override, spec),
                                         streaming=streaming)
        if base.startswith(("/", ".", "~")):
            raise _error(spec, f"directory {str(path)!r} does not exist")
        name, _, config = base.partition(":")
        available = datasets.get_dataset_split_names(name, config or None)
        return datasets.load_dataset(name, config or None, split=_choose_split(available, split, override, spec),
                                     streaming=streaming)
    except DataSourceError:
        raise
    except Exception as e:  # hub unreachable, unknown name or config, unreadable files: all say the spec
        raise _error(spec, f"cannot load the Hugging Face dataset: {type(e).__name__}: {e}") from e


def _columns(table: Any, spec: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(feature per column, a first example when the features are unknown, as for some streams)."""
    if table.features is not None:
        return dict(table.features), None
    try:
        first = next(iter(table))
    except StopIteration:
        raise _error(spec, "the dataset is empty") from None
    return {name: None for name in first}, first


def _pick_columns(features: dict[str, Any], first: dict[str, Any] | None, image: str | None,
                  label: str | None, spec: str) -> tuple[str, str | None]:
    import datasets

    listing = f"available columns: {', '.join(features) or 'none'}"
    for option, name in (("image", image), ("label", label)):
        if name is not None and name not in features:
            raise _error(spec, f"{option} column {name!r} does not exist; {listing}")
    if image is None:
        image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        image = image or next((c for c in IMAGE_COLUMN_NAMES if c in features), None)
        if image is None and first is not None:
            image = next((c for c, v in first.items() if isinstance(v, Image.Image)), None)
        if image is None:
            raise _error(spec, f"no image column found (looked for a datasets.Image feature or a column named "
                               f"{'/'.join(IMAGE_COLUMN_NAMES)}); {listing}; name one with ?image=COL")
    if label is None:
        label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel) and c != image), None)
        label = label or next((c for c in LABEL_COLUMN_NAMES if c in features and c != image), None)
    return image, label


def _label_names(table: Any, feature: Any, column: str, spec: str, streaming: bool) -> tuple[list[str] | None, dict | None]:
    """(class names, a map from stored value to class index for string labels, else None)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    if streaming:
        if isinstance(feature, datasets.Value) and feature.dtype == "string":
            raise _error(spec, f"label column {column!r} holds strings; a streamed dataset needs a ClassLabel or "
                               "integer label column")
        return None, None  # integer labels, number of classes unknown without reading everything
    values = table[column]
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        names = sorted({v for v in values if v is not None})
        return names, {name: i for i, name in enumerate(names)}
    try:
        top = max((int(v) for v in values if v is not None), default=-1)
    except (TypeError, ValueError):
        raise _error(spec, f"label column {column!r} holds {feature}, not integer or string labels; "
                           "name another with ?label=COL") from None
    return ([str(i) for i in range(top + 1)] if top >= 0 else None), None


def _label(value: Any, label_map: dict | None) -> int:
    if value is None:
        return -1
    return label_map[value] if label_map is not None else int(value)


def load_hf_images(arg: str, *, spec: str, resolution: int, split: str = "train", seed: int = 0,
                   transform: TransformConfig | None = None, image_column: str | None = None,
                   label_column: str | None = None, streaming: bool = False,
                   shuffle_buffer: int = 0) -> "HFImages | HFStreamImages":
    """Open the dataset an `hf:` ARG names and wrap it: map-style `HFImages`, or `HFStreamImages`
    with streaming. Raises DataSourceError naming the spec for a missing split, column or data."""
    import datasets

    table = _open(arg, spec, split, streaming)
    features, first = _columns(table, spec)
    image, label = _pick_columns(features, first, image_column, label_column, spec)
    if isinstance(features[image], datasets.Image):
        table = table.cast_column(image, datasets.Image(decode=False))  # decode here, skipping bad bytes
    class_names, label_map = _label_names(table, features[label], label, spec, streaming) if label else (None, None)
    table = table.select_columns([image] + ([label] if label else []))
    common = dict(image_column=image, label_column=label, label_map=label_map, class_names=class_names,
                  resolution=resolution, seed=seed, transform=transform, source=spec, columns=list(features))
    if streaming:
        return HFStreamImages(table, shuffle_buffer=shuffle_buffer, **common)
    if len(table) == 0:
        raise _error(spec, f"the dataset is empty (split {split!r})")
    return HFImages(table, **common)


class _HFBase:
    def _setup(self, image_column: str, label_column: str | None, label_map: dict | None,
               class_names: list[str] | None, resolution: int, seed: int, transform: TransformConfig | None,
               source: str, columns: list[str], shared_epoch: bool = False) -> None:
        self.image_column, self.label_column, self._label_map = image_column, label_column, label_map
        self.class_names = class_names
        self.num_classes: int | None = len(class_names) if class_names else None
        self.resolution, self.seed, self.source, self.columns = resolution, seed, source, columns
        self.skipped_files: list[str] = []
        self.skip_log: Path | None = None
        self._augment = SeededTransform(transform, seed, shared=shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch random transforms (and a stream's shuffle) draw from; reaches DataLoader workers."""
        self._augment.set_epoch(epoch)

    def _row_pil(self, row: dict) -> tuple[Image.Image, int, str | None]:
        image, name = to_pil(row[self.image_column])
        label = _label(row[self.label_column], self._label_map) if self.label_column else -1
        return image, label, name


class HFImages(_HFBase, Dataset):
    """Map-style view of a `datasets.Dataset`: `ds[i]` is `(image (3, R, R) float32 in [-1, 1],
    label or -1)`; an undecodable image is recorded and replaced by the next loadable one."""

    def __init__(self, table: Any, **kwargs: Any):
        self.table = table
        self._setup(**kwargs)

    def __len__(self) -> int:
        return len(self.table)

    def _describe(self, index: int) -> str:
        value = self.table[index][self.image_column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{self.source} item {index}" + (f" ({path})" if path else "")

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self._row_pil(self.table[index])
        return self._augment(image, self.resolution, index), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_or_next(self, index, self._load, self._describe, self.source)

    def pil_item(self, index: int) -> tuple[Image.Image, int, str | None]:
        """Item `index` untransformed, for packing: (RGB PIL image, label, original file name or None)."""
        return self._row_pil(self.table[index])


class HFStreamImages(_HFBase, IterableDataset):
    """A streamed `datasets.IterableDataset` as an IterableDataset of `(image, label)`. Each epoch
    it is shuffled with a buffer of `shuffle_buffer` (seed + epoch, the same shard order on every
    rank), split by rank with `datasets.distributed.split_dataset_by_node` (whole shards when they
    divide evenly, else every world_size-th example), and by DataLoader worker by `datasets`
    itself (shards; workers beyond the shard count stay idle)."""

    def __init__(self, table: Any, *, shuffle_buffer: int = 0, rank: int = 0, world_size: int = 1, **kwargs: Any):
        super().__init__()
        self.table, self.shuffle_buffer, self.rank, self.world_size = table, shuffle_buffer, rank, world_size
        self._setup(shared_epoch=True, **kwargs)
        self.num_samples: int | None = None

    def _rank(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        return self.rank, self.world_size

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._rank()  # read in the main process: spawned DataLoader workers have no process group

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.table
        if self.shuffle_buffer:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        rank, world_size = self._rank()
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        stream.set_epoch(self._augment.epoch)  # after the split, which starts a new dataset at epoch 0
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for i, row in enumerate(stream):
            try:
                image, label, _ = self._row_pil(row)
            except Exception as e:
                record_skip(self, f"{self.source} rank {rank} worker {worker} example {i}", f"{type(e).__name__}: {e}")
                continue
            yield self._augment(image, self.resolution, f"{rank}/{worker}/{i}"), label

    def iter_pil(self) -> Iterator[tuple[Image.Image | Exception, int, str | None]]:
        """Every example in stored order, unshuffled and unsplit, for packing: (RGB PIL image or
        the exception that made it unreadable, label, original file name or None)."""
        for i, row in enumerate(self.table):
            try:
                yield self._row_pil(row)
            except Exception as e:
                yield e, -1, f"{self.source} example {i}"
