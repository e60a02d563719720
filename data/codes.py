"""Pre-encoded code shards for stage 2: encode the images once, train the prior on integer codes
(LlamaGen's `extract_codes` step does the same).

A directory holds `codes-NNNNNN.npy` (N, variants, *code_shape) in the smallest unsigned dtype
that fits the vocabulary, `labels-NNNNNN.npy` (N,) int64 and `manifest.json`, which names the
tokenizer (`tokenizer_hash`) that made the codes. Shards are plain `np.save` files so they can be
memory-mapped; each is written under a temporary name and renamed, then the manifest is rewritten
atomically, so a killed writer resumes from its last listed shard. Imports no model code.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common import atomic_write_json, sha256_file

FORMAT = "vqgan-code-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
VARIANT_NAMES = ("original", "flipped")
# options that must match for a writer to resume an existing directory
RESUME_KEYS = ("format", "version", "tokenizer_hash", "source", "split", "resolution", "variants",
               "shard_size", "code_shape", "vocab_sizes", "dtype", "class_names", "num_classes")
REQUIRED_KEYS = {"format": str, "version": int, "tokenizer_hash": str, "tokenizer_config": dict,
                 "code_shape": list, "vocab_sizes": list, "dtype": str, "variants": int, "source": str,
                 "shard_size": int, "shards": list, "total": int, "complete": bool}


class CodeShardError(ValueError):
    """A code-shard directory is missing, malformed, incomplete or made by another tokenizer;
    the message names the directory or file."""


def code_dtype(max_vocab: int) -> np.dtype:
    """Smallest integer dtype holding codes in [0, max_vocab): uint8, uint16, else int32."""
    if isinstance(max_vocab, bool) or not isinstance(max_vocab, (int, np.integer)) or max_vocab < 1:
        raise CodeShardError(f"max_vocab must be a positive integer, got {max_vocab!r}")
    if max_vocab <= 1 << 8:
        return np.dtype(np.uint8)
    if max_vocab <= 1 << 16:
        return np.dtype(np.uint16)
    if max_vocab <= 1 << 31:
        return np.dtype(np.int32)
    raise CodeShardError(f"max_vocab={max_vocab} does not fit int32 codes")


def shard_names(index: int) -> tuple[str, str]:
    return f"codes-{index:06d}.npy", f"labels-{index:06d}.npy"


def _is_shard_file(name: str) -> bool:
    return (name.startswith("codes-") or name.startswith("labels-")) and name.endswith(".npy")


def _is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check `directory/manifest.json`; a missing or malformed one is a CodeShardError."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CodeShardError(f"{path} is missing: {directory} is not a code-shard directory "
                             f"(make one with `vqgan encode --tokenizer DIR --data SRC --out {directory}`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CodeShardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CodeShardError(f"{path}: expected an object with format={FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CodeShardError(f"{path}: unsupported version {manifest.get('version')!r} (this code reads {VERSION})")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind) or (kind is int and isinstance(manifest[key], bool)):
            raise CodeShardError(f"{path}: key {key!r} is missing or not a {kind.__name__} "
                                 f"(got {manifest.get(key)!r})")
    shape = manifest["code_shape"]
    if len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise CodeShardError(f"{path}: code_shape must be [h, w] or [h, w, D] of positive ints, got {shape}")
    if manifest["variants"] not in (1, 2):
        raise CodeShardError(f"{path}: variants must be 1 or 2, got {manifest['variants']}")
    try:
        np.dtype(manifest["dtype"])
    except TypeError as e:
        raise CodeShardError(f"{path}: unknown dtype {manifest['dtype']!r}") from e
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                and isinstance(shard.get("count"), int) and shard["count"] >= 0
                and isinstance(shard.get("sha256"), str) and isinstance(shard.get("labels_sha256"), str)):
            raise CodeShardError(f"{path}: shards[{i}] must have name, count, sha256 and labels_sha256, got {shard!r}")
    if sum(s["count"] for s in manifest["shards"]) != manifest["total"]:
        raise CodeShardError(f"{path}: total={manifest['total']} is not the sum of the shard counts")
    return manifest


def _labels_name(codes_name: str) -> str:
    return "labels-" + codes_name[len("codes-"):]


def _save_npy(path: Path, array: np.ndarray) -> str:
    """np.save under a temporary name, fsync, rename into place; returns the file's sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


class CodeShardWriter:
    """Accumulate `add(codes (N, variants, *code_shape), labels (N,))` into fixed-size shards.

    On a directory holding a manifest with the same tokenizer and options it resumes: listed
    shards are verified, temporary and unlisted files removed, and `items_done` says how many
    source items to skip. Different options raise ValueError unless `overwrite=True`."""

    def __init__(self, out_dir: str | Path, *, tokenizer_hash: str, tokenizer_config: dict,
                 code_shape: tuple[int, ...], vocab_sizes: list[int], variants: int, shard_size: int,
                 source: str, class_names: list[str] | None, num_classes: int | None,
                 split: str | None = None, resolution: int | None = None, overwrite: bool = False):
        self.dir = Path(out_dir)
        code_shape = tuple(int(s) for s in code_shape)
        vocab_sizes = [int(v) for v in vocab_sizes]
        if len(code_shape) not in (2, 3) or min(code_shape) < 1:
            raise CodeShardError(f"code_shape must be (h, w) or (h, w, D) of positive ints, got {code_shape}")
        if variants not in (1, 2):
            raise CodeShardError(f"variants must be 1 (original) or 2 (original + flipped), got {variants!r}")
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise CodeShardError(f"shard_size must be a positive integer, got {shard_size!r}")
        depth = code_shape[2] if len(code_shape) == 3 else 1
        if not vocab_sizes or len(vocab_sizes) not in (1, depth):
            raise CodeShardError(f"vocab_sizes {vocab_sizes} must have 1 or D={depth} entries for code_shape {code_shape}")
        self.code_shape, self.vocab_sizes, self.variants = code_shape, vocab_sizes, variants
        self.shard_size = shard_size
        self.dtype = code_dtype(max(vocab_sizes))
        self.manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "tokenizer_hash": tokenizer_hash, "tokenizer_config": tokenizer_config,
            "code_shape": list(code_shape), "vocab_sizes": vocab_sizes, "dtype": self.dtype.name,
            "variants": variants, "source": source, "split": split, "resolution": resolution,
            "class_names": list(class_names) if class_names is not None else None,
            "num_classes": num_classes, "shard_size": shard_size,
            "shards": [], "total": 0, "complete": False,
        }
        self._codes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._buffered = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear()
        elif (self.dir / MANIFEST_NAME).exists():
            self._resume()
        else:
            others = [p.name for p in self.dir.iterdir() if not (_is_shard_file(p.name) or _is_temp_file(p.name))]
            if others:
                raise CodeShardError(f"{self.dir} is not empty and has no {MANIFEST_NAME} (found {sorted(others)[:5]}); "
                                 f"choose a new --out directory")
            self._clear()
        self._remove_strays()
        if not self.manifest["complete"]:
            atomic_write_json(self.dir / MANIFEST_NAME, self.manifest)

    @property
    def items_done(self) -> int:
        """Items already written to listed shards: the caller skips this many source items."""
        return self.manifest["total"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def _clear(self) -> None:
        for p in self.dir.iterdir():
            if p.name == MANIFEST_NAME or _is_shard_file(p.name) or _is_temp_file(p.name):
                p.unlink()

    def _remove_strays(self) -> None:
        """Delete temp files and shard files the manifest does not list (a killed write)."""
        listed = {n for s in self.manifest["shards"] for n in (s["name"], _labels_name(s["name"]))}
        for p in self.dir.iterdir():
            if _is_temp_file(p.name) or (_is_shard_file(p.name) and p.name not in listed):
                p.unlink()

    def _resume(self) -> None:
        manifest_path = self.dir / MANIFEST_NAME
        hint = "use a new --out directory, or overwrite=True to discard the existing codes"
        try:
            old = read_manifest(self.dir)
        except CodeShardError as e:
            raise CodeShardError(f"cannot resume: {e}; {hint}") from e
        diffs = [f"{k}: existing {old.get(k)!r} vs this run {self.manifest[k]!r}"
                 for k in RESUME_KEYS if old.get(k) != self.manifest[k]]
        if diffs:
            raise CodeShardError(f"{manifest_path} was made with different options, so this run cannot resume it "
                             f"({'; '.join(diffs)}); {hint}")
        for shard in old["shards"]:
            for name, key in ((shard["name"], "sha256"), (_labels_name(shard["name"]), "labels_sha256")):
                path = self.dir / name
                if not path.is_file():
                    raise CodeShardError(f"cannot resume: {path} listed in {manifest_path} is missing; {hint}")
                if sha256_file(path) != shard[key]:
                    raise CodeShardError(f"cannot resume: {path} does not match its sha256 in {manifest_path} "
                                     f"(corrupted?); {hint}")
        self.manifest["shards"], self.manifest["total"] = old["shards"], old["total"]
        self.manifest["complete"] = old["complete"]

    def add(self, codes: np.ndarray, labels: np.ndarray) -> None:
        """Queue codes (N, variants, *code_shape) and labels (N,); full shards are written at once."""
        if self.complete:
            raise RuntimeError(f"{self.dir} is already complete; nothing more can be added")
        codes, labels = np.asarray(codes), np.asarray(labels)
        expected = (self.variants, *self.code_shape)
        if codes.ndim != len(expected) + 1 or codes.shape[1:] != expected:
            raise CodeShardError(f"codes must have shape (N, {', '.join(map(str, expected))}), got {codes.shape}")
        if labels.shape != (codes.shape[0],):
            raise CodeShardError(f"labels must have shape ({codes.shape[0]},), got {labels.shape}")
        if codes.size:
            limits = np.asarray(self.vocab_sizes)  # broadcasts over the last (depth) axis when D levels
            if codes.min() < 0 or (codes.astype(np.int64) >= limits).any():
                raise CodeShardError(f"codes out of range for vocab_sizes {self.vocab_sizes}: "
                                 f"[{int(codes.min())}, {int(codes.max())}]")
        self._codes.append(codes.astype(self.dtype, copy=False))
        self._labels.append(labels.astype(np.int64, copy=False))
        self._buffered += codes.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        codes, labels = np.concatenate(self._codes), np.concatenate(self._labels)
        self._codes, self._labels = [codes[count:]], [labels[count:]]
        self._buffered -= count
        self._write_shard(np.ascontiguousarray(codes[:count]), np.ascontiguousarray(labels[:count]))

    def _write_shard(self, codes: np.ndarray, labels: np.ndarray) -> None:
        codes_name, labels_name = shard_names(len(self.manifest["shards"]))
        # data files first, manifest last: a kill in between leaves unlisted files, removed on resume
        sha = _save_npy(self.dir / codes_name, codes)
        labels_sha = _save_npy(self.dir / labels_name, labels)
        self.manifest["shards"].append({"name": codes_name, "count": int(codes.shape[0]),
                                        "sha256": sha, "labels_sha256": labels_sha})
        self.manifest["total"] += int(codes.shape[0])
        atomic_write_json(self.dir / MANIFEST_NAME, self.manifest)

    def finish(self) -> dict[str, Any]:
        """Write the last partial shard, mark the set complete; returns the manifest."""
        if not self.complete:
            if self._buffered:
                self._flush(self._buffered)
            self.manifest["complete"] = True
            atomic_write_json(self.dir / MANIFEST_NAME, self.manifest)
        return self.manifest


def _mix(*values: int) -> int:
    """A cheap deterministic 64-bit hash of a few ints (splitmix64 finaliser)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


class CodeDataset(Dataset):
    """Map-style dataset over a complete code-shard directory, memory-mapped:
    `ds[i] -> (codes LongTensor (*code_shape), label int)`.

    `variant`: "random" picks the stored flip variant from (seed, epoch, index) (see `set_epoch`),
    "original" / "flipped" pick one. `tokenizer_hash`, when given, must match the manifest's."""

    def __init__(self, directory: str | Path, *, tokenizer_hash: str | None = None,
                 variant: str = "random", seed: int = 0):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if not manifest["complete"]:
            raise CodeShardError(f"{self.directory} holds an incomplete set of code shards "
                                 f"({manifest['total']} items so far); rerun `vqgan encode` with the same "
                                 f"--out to finish it")
        if tokenizer_hash is not None and tokenizer_hash != manifest["tokenizer_hash"]:
            raise CodeShardError(f"{self.directory} was encoded by tokenizer {manifest['tokenizer_hash']}, "
                                 f"not by the given tokenizer {tokenizer_hash}; re-encode with `vqgan encode` "
                                 f"using this tokenizer")
        if variant not in ("random", *VARIANT_NAMES):
            raise CodeShardError(f"variant must be 'random', 'original' or 'flipped', got {variant!r}")
        if variant == "flipped" and manifest["variants"] < 2:
            raise CodeShardError(f"{self.directory} has no flipped codes (encoded without --flip)")
        self.manifest = manifest
        self.code_shape: tuple[int, ...] = tuple(manifest["code_shape"])
        self.vocab_sizes: list[int] = list(manifest["vocab_sizes"])
        self.class_names: list[str] | None = manifest.get("class_names")
        self.num_classes: int | None = manifest.get("num_classes")
        self.tokenizer_hash: str = manifest["tokenizer_hash"]
        self.tokenizer_config: dict = manifest["tokenizer_config"]
        self.variants: int = manifest["variants"]
        self.variant, self.seed, self.epoch = variant, seed, 0
        self.dtype = np.dtype(manifest["dtype"])
        self._paths: list[tuple[Path, Path]] = []
        for shard in manifest["shards"]:
            codes_path = self.directory / shard["name"]
            labels_path = self.directory / _labels_name(shard["name"])
            self._check_file(codes_path, (shard["count"], self.variants, *self.code_shape), self.dtype)
            self._check_file(labels_path, (shard["count"],), np.dtype(np.int64))
            self._paths.append((codes_path, labels_path))
        self._starts = np.cumsum([0] + [s["count"] for s in manifest["shards"]]).tolist()
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # opened lazily, per process

    @staticmethod
    def _check_file(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """The header says the expected shape/dtype and the file is exactly as long as that needs."""
        if not path.is_file():
            raise CodeShardError(f"{path} is missing (listed in {path.parent / MANIFEST_NAME}); re-run `vqgan encode`")
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                header_shape, fortran, file_dtype = read_header(f)
                offset = f.tell()
        except (ValueError, OSError) as e:
            raise CodeShardError(f"{path} is not a readable .npy file: {e}") from e
        if tuple(header_shape) != shape or file_dtype != dtype or fortran:
            raise CodeShardError(f"{path} holds {file_dtype}{tuple(header_shape)}, but the manifest says "
                                 f"{dtype}{shape}")
        size, expected = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
        if size != expected:
            raise CodeShardError(f"{path} is {size} bytes, expected {expected} for {dtype}{shape} (truncated?)")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memory maps are reopened in each worker, never pickled (that copies them)
        return state

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the random flip variants for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._arrays:
            codes_path, labels_path = self._paths[k]
            self._arrays[k] = (np.load(codes_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r"))
        return self._arrays[k]

    def variant_of(self, index: int) -> int:
        """Stored variant (0 original, 1 flipped) that item `index` returns this epoch."""
        if self.variant == "original" or self.variants == 1:
            return 0
        if self.variant == "flipped":
            return 1
        return _mix(self.seed, self.epoch, index) & 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        k = bisect.bisect_right(self._starts, index) - 1
        codes, labels = self._shard(k)
        row = index - self._starts[k]
        return torch.from_numpy(codes[row, self.variant_of(index)].astype(np.int64)), int(labels[row])

    def labels(self) -> np.ndarray:
        """All labels (N,) int64, e.g. for class-balanced sampling."""
        if not self._paths:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(self._shard(k)[1]) for k in range(len(self._paths))])
