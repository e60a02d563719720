"""An endless stream of batches whose position survives checkpoints, for every training loop.

Map-style datasets go through Accelerate (`accelerator.prepare`: a seeded sampler sharded over
processes, `skip_first_batches` on resume). Iterable datasets (webdataset shards, streaming HF)
split themselves by process and worker, so they are not prepared (Accelerate would split them a
second time); they are iterated and the consumed batches skipped on resume.

The position (epoch, batch within the epoch) is saved through `state_dict`, so a resumed run
sees exactly the batches the interrupted one would have seen.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data.errors import DataSourceError


def _set_epoch(obj: Any, epoch: int) -> None:
    if hasattr(obj, "set_epoch"):
        obj.set_epoch(epoch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class ResumableLoader:
    """`next(loader)` -> the next batch, across epochs without end; `state_dict()` is its position."""

    def __init__(self, dataset: Dataset, *, batch_size: int, accelerator=None, num_workers: int = 0,
                 seed: int = 0, drop_last: bool = True):
        self.dataset = dataset
        self.accelerator = accelerator
        self.iterable = isinstance(dataset, IterableDataset)
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        # workers are not persistent: each epoch's workers get a fresh copy of the dataset, so the
        # epoch set on it (random crops, flips, shard order) reaches them
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=not self.iterable, drop_last=drop_last,
                            num_workers=num_workers, pin_memory=self.device.type == "cuda",
                            generator=None if self.iterable else torch.Generator().manual_seed(seed))
        if not self.iterable:
            if len(loader) == 0:
                raise DataSourceError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}")
            if accelerator is not None:
                loader = accelerator.prepare(loader)
        self.loader = loader
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int | None:
        return None if self.iterable else len(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._iterator = None  # restart from the restored position on the next batch

    def _start_epoch(self) -> Iterator:
        _set_epoch(self.dataset, self.epoch)
        _set_epoch(self.loader, self.epoch)
        skip = self.batch_in_epoch
        if skip and not self.iterable and self.accelerator is not None:
            return iter(self.accelerator.skip_first_batches(self.loader, skip))
        iterator = iter(self.loader)
        # no random access into a stream: read past what was consumed (a no-op when skip is 0)
        next(itertools.islice(iterator, skip, skip), None)
        return iterator

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Any:
        while True:
            if self._iterator is None:
                self._iterator = self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batch_in_epoch == 0:
                    raise RuntimeError("the dataset yielded no batch in a whole epoch "
                                       "(fewer items than one batch on this process?)") from None
                self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            return batch if (self.accelerator is not None and not self.iterable) else _to_device(batch, self.device)
