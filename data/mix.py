"""Mix a real image source with a synthetic one, e.g. generated images used to augment training data.

    mix:folder:/data/real|folder:runs/gen/?synthetic=0.3    30% of each epoch's items synthetic

`synthetic_fraction` f in [0, 1) is the share of synthetic items in an epoch; the real data is
never subsampled. Map-style sources give a `MixedImages` of len(real) + round(len(real) * f / (1 - f))
items: the real items first, then synthetic ones drawn by a seeded permutation per epoch
(`set_epoch`), cycled with repeats when the synthetic set is smaller. When either side is an
IterableDataset (wds shards, streaming hf), `MixedStream` interleaves the two streams with a
seeded coin of bias f and ends with the real stream. Class ids must mean the same on both sides:
write the generated folder with a `classes.json` (see `data.folder`) in the prior's class order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from data.errors import DataSourceError
from data.wds import ReaderSlots

_MIX_STREAM = 0x6D6978  # "mix": keeps the mix's draws apart from the children's own [seed, epoch, ...] streams


def _is_placeholder(names: list[str] | None) -> bool:
    """Names a source invents when it has only label ids ("0", "1", ...; npz, wds ?classes=N)."""
    return names is not None and list(names) == [str(i) for i in range(len(names))]


def _combined_classes(real: Any, synthetic: Any, source: str) -> tuple[list[str] | None, int | None]:
    """(class_names, num_classes) of the mix; raises when labels cannot mean the same on both sides."""
    real_n, syn_n = getattr(real, "num_classes", None), getattr(synthetic, "num_classes", None)
    if (real_n is None) != (syn_n is None):
        labelled, unlabelled = ("synthetic", "real") if real_n is None else ("real", "synthetic")
        raise DataSourceError(f"{source}: the {labelled} source is labelled but the {unlabelled} one is not; "
                              f"mix two labelled sources or two unlabelled ones")
    if real_n != syn_n:
        raise DataSourceError(f"{source}: the real source has {real_n} classes but the synthetic one {syn_n}; "
                              f"class ids must mean the same on both sides")
    real_names, syn_names = getattr(real, "class_names", None), getattr(synthetic, "class_names", None)
    if real_names and syn_names and list(real_names) != list(syn_names) \
            and not _is_placeholder(real_names) and not _is_placeholder(syn_names):
        raise DataSourceError(f"{source}: class names differ: real {list(real_names)}, synthetic {list(syn_names)} "
                              f"(write classes.json in the generated folder to fix its class order)")
    named = [n for n in (real_names, syn_names) if n and not _is_placeholder(n)]
    names = named[0] if named else (real_names or syn_names)
    return (list(names) if names else None), real_n


class _MixBase:
    """What both variants share: checks, class names, epochs and the skip channel of the children."""

    def _setup(self, real: Any, synthetic: Any, synthetic_fraction: float, seed: int, spec: str | None) -> None:
        self.source = f"data spec {spec!r}" if spec else type(self).__name__
        if isinstance(synthetic_fraction, bool) or not isinstance(synthetic_fraction, (int, float)) \
                or not 0.0 <= synthetic_fraction < 1.0:
            raise DataSourceError(f"{self.source}: synthetic fraction must be a number in [0, 1), "
                                  f"got {synthetic_fraction!r}")
        res_real, res_syn = getattr(real, "resolution", None), getattr(synthetic, "resolution", None)
        if res_real is not None and res_syn is not None and res_real != res_syn:
            raise DataSourceError(f"{self.source}: the real source is {res_real} px but the synthetic one {res_syn} px")
        self.real, self.synthetic = real, synthetic
        self.synthetic_fraction, self.seed, self.epoch = float(synthetic_fraction), seed, 0
        self.resolution: int | None = res_real if res_real is not None else res_syn
        self.class_names, self.num_classes = _combined_classes(real, synthetic, self.source)
        self._skip_log: Path | None = None

    @property
    def skipped_files(self) -> list[str]:
        """Files either side skipped in this process (a fresh list: record skips on the children)."""
        return list(getattr(self.real, "skipped_files", None) or []) + \
            list(getattr(self.synthetic, "skipped_files", None) or [])

    @property
    def skip_log(self) -> Path | None:
        return self._skip_log

    @skip_log.setter
    def skip_log(self, directory: Path | None) -> None:
        # the children do the skipping, so they must write the log
        self._skip_log = directory
        for child in (self.real, self.synthetic):
            child.skip_log = directory

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the synthetic draw and both children's transforms/shuffles follow it."""
        self.epoch = epoch
        for child in (self.real, self.synthetic):
            if hasattr(child, "set_epoch"):
                child.set_epoch(epoch)


class MixedImages(_MixBase, Dataset):
    """Map-style mix: `ds[i]` is real item i for i < len(real), else the synthetic item chosen for
    this epoch; `(image (3, R, R) float32 in [-1, 1], label int or -1)` like every source."""

    def __init__(self, real: Dataset, synthetic: Dataset, synthetic_fraction: float, *, seed: int = 0,
                 spec: str | None = None):
        if isinstance(real, IterableDataset) or isinstance(synthetic, IterableDataset):
            raise DataSourceError(f"{f'data spec {spec!r}' if spec else 'MixedImages'}: a streaming source needs MixedStream "
                                  f"(use mix_datasets, which picks the variant)")
        self._setup(real, synthetic, synthetic_fraction, seed, spec)
        if len(real) == 0 or len(synthetic) == 0:
            raise DataSourceError(f"{self.source}: the real source has {len(real)} items and the synthetic one "
                                  f"{len(synthetic)}; both need at least one")
        f = self.synthetic_fraction
        self.num_synthetic = round(len(real) * f / (1.0 - f))
        self._choose()

    def _choose(self) -> None:
        # back-to-back permutations: every synthetic item once before any repeats
        rng = np.random.default_rng([self.seed, self.epoch, _MIX_STREAM])
        n, size = self.num_synthetic, len(self.synthetic)
        cycles = -(-n // size)
        picks = [rng.permutation(size) for _ in range(cycles)]
        self._chosen = np.concatenate(picks)[:n] if picks else np.zeros(0, np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: which synthetic items are drawn, and the children's random transforms."""
        super().set_epoch(epoch)
        self._choose()

    def __len__(self) -> int:
        return len(self.real) + self.num_synthetic

    def locate(self, index: int) -> tuple[str, int]:
        """("real" or "synthetic", the index in that source) of item `index` this epoch."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"MixedImages index {index} out of range for {n} items")
        index %= n
        real_n = len(self.real)
        return ("real", index) if index < real_n else ("synthetic", int(self._chosen[index - real_n]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        side, i = self.locate(index)
        return (self.real if side == "real" else self.synthetic)[i]


class MixedStream(_MixBase, ReaderSlots, IterableDataset):
    """Iterable mix: before each real item, a coin of bias f (`default_rng([seed, epoch, slot, ...])`)
    decides whether a synthetic item comes first, so the expected synthetic share is f; the epoch
    ends with the real stream and the synthetic stream restarts when it runs out. An iterable side
    splits itself by rank and DataLoader worker; a map-style side is split here the same way
    (shuffled by epoch when `shuffle`). `rank`/`world_size` apply when torch.distributed is off."""

    def __init__(self, real: Dataset, synthetic: Dataset, synthetic_fraction: float, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, spec: str | None = None):
        super().__init__()
        self._setup(real, synthetic, synthetic_fraction, seed, spec)
        if not 0 <= rank < world_size:
            raise DataSourceError(f"{self.source}: rank {rank} is not in 0..{world_size - 1}")
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self._update_rank()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._update_rank()

    def _order(self, size: int, cycle: int, shuffle: bool) -> np.ndarray:
        # the same on every reader, so slicing it by slot splits a map-style side without overlap
        return np.random.default_rng([self.seed, self.epoch, cycle, _MIX_STREAM]).permutation(size) \
            if shuffle else np.arange(size)

    def _real_items(self, slot: int, slots: int) -> Iterator[tuple[torch.Tensor, int]]:
        if isinstance(self.real, IterableDataset):
            yield from self.real
            return
        for i in self._order(len(self.real), 0, self.shuffle)[slot::slots]:
            yield self.real[int(i)]

    def _synthetic_items(self, slot: int, slots: int) -> Iterator[tuple[torch.Tensor, int]]:
        """The synthetic side without end: restarted (map-style: a fresh permutation) when it runs out."""
        cycle = 0
        while True:
            cycle += 1
            if isinstance(self.synthetic, IterableDataset):
                items: Any = self.synthetic
            else:
                order = self._order(len(self.synthetic), cycle, True)
                # with fewer items than readers every reader draws from all of them: repeats are fine here
                order = order[slot::slots] if len(order) >= slots else order
                items = (self.synthetic[int(i)] for i in order)
            count = 0
            for item in items:
                count += 1
                yield item
            if count == 0:
                raise DataSourceError(f"{self.source}: the synthetic source yielded no items for reader "
                                      f"{slot} of {slots} (rank x DataLoader worker); it needs more samples or shards")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        slot, slots = self._slot()
        coin = np.random.default_rng([self.seed, self.epoch, slot, slots, _MIX_STREAM])
        synthetic = self._synthetic_items(slot, slots) if self.synthetic_fraction > 0 else iter(())
        for item in self._real_items(slot, slots):
            while coin.random() < self.synthetic_fraction:  # geometric run: share f in expectation
                yield next(synthetic)
            yield item


def mix_datasets(real: Dataset, synthetic: Dataset, synthetic_fraction: float, *, seed: int = 0,
                 shuffle: bool = True, spec: str | None = None) -> MixedImages | MixedStream:
    """`MixedImages` when both sources are map-style, else `MixedStream`; `shuffle` orders a
    map-style side of a stream (map-style mixes are shuffled by the DataLoader's sampler)."""
    if isinstance(real, IterableDataset) or isinstance(synthetic, IterableDataset):
        return MixedStream(real, synthetic, synthetic_fraction, seed=seed, shuffle=shuffle, spec=spec)
    return MixedImages(real, synthetic, synthetic_fraction, seed=seed, spec=spec)
