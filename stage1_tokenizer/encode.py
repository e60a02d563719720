"""Encode a dataset once into code shards for stage 2 (`vqgan encode`), resumably.

The source is read in its natural order; encode batches never straddle a shard boundary and
restart at every one, so a killed-and-rerun encode sees the same batches as an uninterrupted one
and writes byte-identical files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from common import config_to_dict
from data import build_dataset
from data.codes import CodeDataset, CodeShardWriter
from stage1_tokenizer.model import VQGAN


def _skip(batches: Iterable, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Drop the first `count` items of a stream of (images, labels) batches."""
    for images, labels in batches:
        if count >= len(images):
            count -= len(images)
            continue
        yield images[count:], labels[count:]
        count = 0


def _aligned(batches: Iterable, start: int, batch_size: int, shard_size: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-cut batches (items from absolute index `start`, a shard boundary) so each lies inside
    one shard and starts at a multiple of batch_size within it."""
    images_buf: list[torch.Tensor] = []
    labels_buf: list[torch.Tensor] = []
    buffered, pos = 0, start

    def needed(p: int) -> int:
        in_shard = p % shard_size
        return min(batch_size - in_shard % batch_size, shard_size - in_shard)

    for images, labels in batches:
        images_buf.append(images)
        labels_buf.append(torch.as_tensor(labels))
        buffered += len(images)
        while buffered >= needed(pos):
            n = needed(pos)
            all_images, all_labels = torch.cat(images_buf), torch.cat(labels_buf)
            yield all_images[:n], all_labels[:n]
            images_buf, labels_buf = [all_images[n:]], [all_labels[n:]]
            buffered -= n
            pos += n
    if buffered:
        yield torch.cat(images_buf), torch.cat(labels_buf)


def encode_dataset(tokenizer: VQGAN, spec: str, out_dir: str | Path, *, resolution: int | None = None,
                   split: str = "train", flip: bool = False, batch_size: int = 64, shard_size: int = 10000,
                   device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                   overwrite: bool = False) -> dict[str, Any]:
    """Encode every image of `spec` into code shards in `out_dir` (codes (N, 1 or 2, h, w[, D]):
    original and, with `flip`, the horizontally flipped image); resumes an interrupted run.
    Returns the manifest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    resolution = tokenizer.config.resolution if resolution is None else resolution
    h, w = tokenizer.code_grid(resolution)
    depth = tokenizer.code_depth
    code_shape = (h, w) if depth == 1 else (h, w, depth)
    variants = 2 if flip else 1
    dataset = build_dataset(spec, resolution=resolution, split=split, shuffle=False)  # natural order
    writer = CodeShardWriter(
        out_dir, tokenizer_hash=tokenizer.content_hash(), tokenizer_config=config_to_dict(tokenizer.config),
        code_shape=code_shape, vocab_sizes=tokenizer.vocab_sizes, variants=variants, shard_size=shard_size,
        source=spec, split=split, resolution=resolution, class_names=getattr(dataset, "class_names", None),
        num_classes=getattr(dataset, "num_classes", None), overwrite=overwrite)
    done = writer.items_done
    if not writer.complete:
        if isinstance(dataset, IterableDataset):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(0)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
            batches = _skip(loader, done)  # a stream cannot seek: read past what is already encoded
        else:
            loader = DataLoader(Subset(dataset, range(done, len(dataset))), batch_size=batch_size,
                                shuffle=False, num_workers=num_workers)
            batches = iter(loader)
        try:
            total = len(dataset)
        except TypeError:
            total = None
        was_training = tokenizer.training
        tokenizer.to(device).eval()
        bar = tqdm(total=total, initial=done, desc="encode", unit="img", disable=not progress)
        with torch.inference_mode():
            for images, labels in _aligned(batches, done, batch_size, shard_size):
                images = images.to(device)
                stacked = [tokenizer.encode(images)]  # (B, h, w[, D])
                if flip:
                    stacked.append(tokenizer.encode(images.flip(-1)))
                codes = torch.stack(stacked, 1).reshape(len(images), variants, *code_shape)
                writer.add(codes.cpu().numpy().astype(writer.dtype), labels.numpy().astype(np.int64))
                bar.update(len(images))
        bar.close()
        tokenizer.train(was_training)
    manifest = writer.finish()
    if progress:
        print(f"encoded {manifest['total']} items of {spec!r} ({split}, {resolution} px) into "
              f"{len(manifest['shards'])} shard(s) in {out_dir}: codes {manifest['dtype']} "
              f"(N, {variants}, {', '.join(map(str, code_shape))}), tokenizer {manifest['tokenizer_hash'][:12]}")
    return manifest


def load_code_dataset(directory: str | Path, tokenizer: VQGAN | None = None, **kwargs: Any) -> CodeDataset:
    """CodeDataset over `directory`, checked against `tokenizer` (its content hash) when given."""
    return CodeDataset(directory, tokenizer_hash=tokenizer.content_hash() if tokenizer is not None else None,
                       **kwargs)
