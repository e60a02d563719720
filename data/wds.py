"""WdsImages: webdataset tar shards (`wds:/data/train-{000000..000099}.tar`) as an IterableDataset.

Each epoch the shard list is shuffled by `default_rng([seed, epoch])`, identically on every
process, then dealt out to the (rank, DataLoader worker) slots: slot s of S reads shards s, s+S,
... When there are fewer shards than slots, every slot reads every shard and keeps sample i when
i % S == s, so the slots still cover the data exactly once between them. Within a slot a seeded
shuffle buffer mixes samples across its shards.

A sample is `KEY.jpg|jpeg|png|webp|ppm|bmp` (the first present) plus an optional `KEY.cls`
(integer text; absent means label -1). A `manifest.json` next to local shards (written by
`data.pack.pack_dataset`) gives class names and sample counts. Corrupt members and truncated
shards are skipped and recorded with `record_skip`, never fatal.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import webdataset
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.errors import DataSourceError, record_skip
from data.transforms import SeededTransform, TransformConfig, decode_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vqgan-webdataset"
MANIFEST_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 1000


def shuffle_buffer_size(buffer: int | None, shuffle: bool | None, split: str) -> int:
    """The within-worker shuffle buffer: `buffer` (the `shuffle=N` option; default 1000 for the
    train split, else 0), forced to 0 by shuffle=False and to at least 1000 by shuffle=True."""
    if shuffle is False:
        return 0
    size = buffer if buffer is not None else (DEFAULT_SHUFFLE_BUFFER if split == "train" else 0)
    return size or (DEFAULT_SHUFFLE_BUFFER if shuffle else 0)


def is_remote(url: str) -> bool:
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The pack manifest in `directory`, or None when there is none; a malformed one is an error."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataSourceError(f"shard manifest {str(path)!r} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataSourceError(f"shard manifest {str(path)!r} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer: once `buffer_size` samples are held, each new one replaces
    a random held one, which is yielded."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ReaderSlots:
    """Which (rank, DataLoader worker) slot this reader is: iterable sources deal their data out by it."""

    rank: int = 0
    world_size: int = 1

    def _update_rank(self) -> None:
        # read in the main process (construction, set_epoch): spawned workers have no process group
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _slot(self) -> tuple[int, int]:
        """(this reader's slot, number of slots) over ranks x DataLoader workers."""
        self._update_rank()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers


class WdsImages(ReaderSlots, IterableDataset):
    """Iterable dataset over webdataset shards yielding `(image (3, R, R) float32 in [-1, 1],
    label int or -1)`; see the module docstring for how shards are split and shuffled.

    `rank`/`world_size` are used only when torch.distributed is not initialized. `len()` works only
    when a manifest gives the sample counts of all shards (`num_samples`, the whole dataset, not
    this rank's share); otherwise `num_samples` is None."""

    def __init__(self, urls: str | Sequence[str], resolution: int, *, split: str = "train", seed: int = 0,
                 transform: TransformConfig | None = None, shuffle: bool | None = None,
                 shuffle_buffer: int | None = None, rank: int = 0, world_size: int = 1,
                 num_classes: int | None = None, spec: str | None = None):
        super().__init__()
        self.source = f"data spec {spec!r}" if spec else f"webdataset shards {urls!r}"
        try:
            self.urls: list[str] = webdataset.SimpleShardList(urls).urls
        except (IndexError, ValueError) as e:
            raise DataSourceError(f"{self.source}: no shard URLs in {urls!r}") from e
        if not self.urls:
            raise DataSourceError(f"{self.source}: no shard URLs in {urls!r}")
        if not 0 <= rank < world_size:
            raise DataSourceError(f"{self.source}: rank {rank} is not in 0..{world_size - 1}")
        self.resolution, self.split, self.seed = resolution, split, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer_size(shuffle_buffer, shuffle, split)
        self.skipped_files: list[str] = []
        self.skip_log: Path | None = None
        self._augment = SeededTransform(transform, seed, shared=True)  # the epoch also orders the shards

        local = [u for u in self.urls if not is_remote(u)]
        missing = [u for u in local if not _local_path(u).is_file()]
        if missing:
            raise DataSourceError(f"{self.source}: {len(missing)} of {len(self.urls)} shard(s) do not exist, "
                                  f"e.g. {missing[0]!r}")
        manifest = read_manifest(_local_path(local[0]).parent) if local else None
        counts = {s["name"]: int(s["count"]) for s in manifest["shards"]} if manifest else {}
        names = [os.path.basename(u) for u in self.urls]
        self._shard_counts = {n: counts[n] for n in names if n in counts}
        self._last_error: tuple[str, str] | None = None
        self.num_samples: int | None = sum(counts[n] for n in names) if counts and all(n in counts for n in names) else None
        if self.num_samples == 0:
            raise DataSourceError(f"{self.source}: the manifest lists 0 samples in these shards")
        class_names = manifest.get("class_names") if manifest else None
        if num_classes is not None:
            class_names = class_names if class_names and len(class_names) == num_classes else [str(i) for i in range(num_classes)]
        self.class_names: list[str] | None = list(class_names) if class_names else None
        self.num_classes: int | None = len(self.class_names) if self.class_names else None
        self._update_rank()
        if self.num_samples is not None:
            self.__class__ = SizedWdsImages  # len() only where the count is known

    # ---- epochs and splitting ----

    @property
    def epoch(self) -> int:
        return self._augment.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard order, the shuffle buffer and random transforms follow it.
        Reaches DataLoader workers, persistent ones included."""
        self._augment.set_epoch(epoch)
        self._update_rank()

    def _epoch_shards(self) -> list[str]:
        if not self.shuffle_buffer:
            return list(self.urls)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order]

    # ---- reading ----

    def _on_error(self, exn: Exception) -> bool:
        """webdataset handler: record the bad member or shard (once) and go on."""
        texts = [a for a in exn.args if isinstance(a, str)]
        where = next((u for u in self.urls if u in texts), None)
        where = where or next((u for u in self.urls if any(u in t for t in texts)), "shard")
        reason = f"{type(exn).__name__}: {str(exn.args[0]).split(' @ ')[0] if exn.args else exn}"
        if (where, reason) != self._last_error:  # a broken stream raises again at the next header
            record_skip(self, where, reason)
        self._last_error = (where, reason)
        return True

    def _read(self, shards: list[str], check_counts: bool) -> Iterator[dict]:
        """Raw samples of `shards` in order. A shard that ends early without an error (tar stops
        quietly when cut at a header) is caught by comparing with the manifest's count."""
        for url in shards:
            count, self._last_error = 0, None
            for sample in webdataset.tarfile_samples([{"url": url}], handler=self._on_error):
                count += 1
                yield sample
            expected = self._shard_counts.get(os.path.basename(url))
            if check_counts and expected is not None and count < expected and self._last_error is None:
                record_skip(self, url, f"read {count} of the {expected} samples its manifest lists; truncated?")

    def _samples(self, slot: int, slots: int, shuffle: bool) -> Iterator[dict]:
        shards = self._epoch_shards() if shuffle else list(self.urls)
        if len(shards) >= slots:
            samples = self._read(shards[slot::slots], check_counts=True)
        else:  # too few shards to deal out: everyone reads all of them and keeps every slots-th sample
            samples = (s for i, s in enumerate(self._read(shards, check_counts=slot == 0)) if i % slots == slot)
        if shuffle and self.shuffle_buffer:
            samples = _shuffled(samples, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, slot, slots]))
        return samples

    def _decode(self, sample: dict) -> tuple[Image.Image, int, str]:
        """(RGB image, label, name) of one raw sample; raises when the sample is unusable."""
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"no image entry ({'/'.join(IMAGE_KEYS)}) in sample; it has {found}")
        label = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1
        return decode_image(sample[ext]), label, f"{os.path.basename(sample['__url__'])}/{sample['__key__']}.{ext}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        slot, slots = self._slot()
        for sample in self._samples(slot, slots, shuffle=True):
            try:
                image, label, name = self._decode(sample)
            except Exception as e:
                record_skip(self, f"{sample.get('__url__')}:{sample.get('__key__')}", f"{type(e).__name__}: {e}")
                continue
            yield self._augment(image, self.resolution, name), label

    def iter_pil(self) -> Iterator[tuple[Image.Image | Exception, int, str | None]]:
        """Every sample in shard order, unshuffled and unsplit, for packing: (RGB PIL image at its
        own size, or the exception that made it unreadable, label, name)."""
        for sample in self._samples(0, 1, shuffle=False):
            try:
                yield self._decode(sample)
            except Exception as e:
                yield e, -1, f"{sample.get('__url__')}:{sample.get('__key__')}"


class SizedWdsImages(WdsImages):
    """A `WdsImages` whose manifest knows how many samples its shards hold."""

    def __len__(self) -> int:
        return self.num_samples
