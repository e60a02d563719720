"""Synthetic training data: class-labelled samples of a prior, decoded by its tokenizer.

    OUT/<class>/<class>_000000.png ...  + OUT/classes.json        format "folder" (`folder:OUT`)
    OUT/shard-000000.tar ...            + OUT/manifest.json       format "wds" (`wds:OUT/shard-{...}.tar`)
    OUT/augment.json                    options, model hashes, one record per image (file, class, seed, sha256)

The work is cut into chunks: chunk k of class c holds images k*batch_size ... of that class and is
sampled with its own generator seeded by SeedSequence([seed, c, k]), so any chunk can be
regenerated alone and the output does not depend on which chunks a previous run finished. Files
are written atomically and augment.json is rewritten after every chunk; a rerun with the same
options skips the chunks it lists (after checking their sha256), so a killed run finishes
byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common import atomic_write_bytes, atomic_write_json, sha256_file
from data.pack import shard_name, write_shard
from data.wds import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from stage1_tokenizer import VQGAN
from stage2_prior.images import decoding_record
from stage2_prior.model import CodePrior
from stage2_prior.sample import _check_options, generate

logger = logging.getLogger(__name__)

AUGMENT_NAME = "augment.json"
CLASSES_NAME = "classes.json"
AUGMENT_FORMAT = "vqgan-augment"
AUGMENT_VERSION = 1
FORMATS = ("folder", "wds")
OPTION_KEYS = ("per_class", "classes", "cfg_scale", "temperature", "top_k", "top_p", "seed", "batch_size",
               "format", "weights_dtype")
_SHARD_RE = re.compile(r"shard-\d{6}\.tar")


class AugmentError(ValueError):
    """Options that do not fit the prior, or an output directory holding another augment run."""


def chunk_seed(seed: int, class_id: int, chunk: int) -> int:
    """The generator seed of chunk `chunk` of class `class_id`: independent of every other chunk."""
    return int(np.random.SeedSequence([seed, class_id, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


def prior_content_hash(prior: CodePrior) -> str:
    """sha256 over the prior's config, class names and tensors (for priors not loaded from a file)."""
    digest = hashlib.sha256(json.dumps(prior.config_dict("", None), sort_keys=True, default=str).encode())
    for name, tensor in sorted(prior.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_names(class_names: Sequence[str]) -> list[str]:
    """Class names -> distinct directory names that are safe on every file system (no separators,
    no leading dot, which the folder source would skip as hidden; unique ignoring case)."""
    names, seen = [], {AUGMENT_NAME, CLASSES_NAME, MANIFEST_NAME}  # never a folder named like our files
    for i, name in enumerate(class_names):
        safe = re.sub(r"[^\w.\- ]+", "_", name).strip(" .")[:100] or f"class_{i:03d}"
        if safe.lower() in seen:
            safe = f"{safe}_{i:03d}"
        seen.add(safe.lower())
        names.append(safe)
    return names


def _png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> PNG bytes, rounded as torchvision's save_image does."""
    unit = (image.float().clamp(-1, 1) + 1) / 2
    array = unit.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Layout:
    """Where chunk (class, k) of a run goes, and which files in OUT belong to the run."""

    def __init__(self, out: Path, output_format: str, classes: list[int], per_class: int, batch_size: int,
                 class_names: list[str]):
        self.out, self.format, self.classes = out, output_format, classes
        self.per_class, self.batch_size, self.class_names = per_class, batch_size, class_names
        self.dirs = folder_names(class_names)
        self.chunks_per_class = math.ceil(per_class / batch_size)

    def chunks(self) -> list[tuple[int, int]]:
        """Every (class id, chunk) in output order."""
        return [(c, k) for c in self.classes for k in range(self.chunks_per_class)]

    def number(self, c: int, k: int) -> int:
        return self.classes.index(c) * self.chunks_per_class + k

    def count(self, k: int) -> int:
        return min(self.batch_size, self.per_class - k * self.batch_size)

    def image_file(self, c: int, index: int) -> str:
        return f"{self.dirs[c]}/{self.dirs[c]}_{index:06d}.png"

    def key(self, c: int, index: int) -> str:
        return f"{c:06d}_{index:06d}"

    def shard(self, c: int, k: int) -> str:
        return shard_name(self.number(c, k))

    def files(self, chunk: dict[str, Any]) -> list[str]:
        if self.format == "wds":
            return [chunk["shard"]]
        return [record["file"] for record in chunk["images"]]

    def remove_strays(self, keep: set[str]) -> None:
        """Delete temporary files and this run's output files that no verified chunk lists."""
        if self.format == "wds":
            candidates = [p for p in self.out.iterdir() if p.is_file()
                          and (_SHARD_RE.fullmatch(p.name) or p.name.endswith(".tmp"))]
        else:
            candidates = [p for p in self.out.iterdir() if p.is_file() and p.name.endswith(".tmp")]
            for c in self.classes:
                folder = self.out / self.dirs[c]
                if folder.is_dir():
                    pattern = re.compile(re.escape(self.dirs[c]) + r"_\d{6}\.png")
                    candidates += [p for p in folder.iterdir() if p.is_file()
                                   and (pattern.fullmatch(p.name) or p.name.endswith(".tmp"))]
        for path in candidates:
            if path.relative_to(self.out).as_posix() not in keep:
                path.unlink()


def _verified(out: Path, layout: _Layout, chunk: dict[str, Any]) -> bool:
    """A recorded chunk counts as done only when all its files exist with the recorded sha256."""
    if layout.format == "wds":
        path = out / chunk["shard"]
        return path.is_file() and sha256_file(path) == chunk["shard_sha256"]
    return all((out / r["file"]).is_file() and sha256_file(out / r["file"]) == r["sha256"] for r in chunk["images"])


def _previous_chunks(out: Path, options: dict[str, Any], hashes: dict[str, Any],
                     layout: _Layout) -> dict[tuple[int, int], dict[str, Any]]:
    """The verified chunks of an earlier run into `out`; an earlier run with other options is an error."""
    path = out / AUGMENT_NAME
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AugmentError(f"{path} cannot be read ({e}); use another --out or delete it") from e
    if not isinstance(previous, dict) or previous.get("format") != AUGMENT_FORMAT:
        raise AugmentError(f"{path} is not a {AUGMENT_FORMAT} manifest; use another --out")
    recorded = {**previous.get("options", {}), **{k: previous.get(k) for k in hashes}}
    now = {**options, **hashes}
    different = [k for k in now if recorded.get(k) != now[k]]
    if different:
        raise AugmentError(f"{out} already holds augment output made with other settings "
                           f"({', '.join(f'{k}={recorded.get(k)!r}, now {now[k]!r}' for k in different)}); "
                           f"use another --out to keep it, or rerun with the same settings to resume it")
    images: dict[tuple[int, int], list[dict[str, Any]]] = {}
    done = {}
    try:
        for record in previous.get("images", []):
            images.setdefault((record["class"], record["chunk"]), []).append(record)
        for chunk in previous.get("chunks", []):
            chunk = {**chunk, "images": images.get((chunk["class"], chunk["chunk"]), [])}
            if len(chunk["images"]) == chunk["count"] and _verified(out, layout, chunk):
                done[(chunk["class"], chunk["chunk"])] = chunk
            else:
                logger.warning("augment %s: chunk %d of class %d is missing files or does not match its sha256; "
                               "generating it again", out, chunk["chunk"], chunk["class"])
    except (KeyError, TypeError) as e:
        raise AugmentError(f"{path} is malformed ({type(e).__name__}: {e}); use another --out or delete it") from e
    return done


def _check_run_options(prior: CodePrior, per_class: int, classes: Sequence[int] | None, batch_size: int, seed: int,
                       output_format: str) -> list[int]:
    """-> the class ids to generate, sorted; every bad option is an AugmentError."""
    num_classes = prior.config.num_classes
    if num_classes == 0:
        raise AugmentError("this prior is unconditional (num_classes=0) and augment writes class-labelled images; "
                           "use `vqgan sample` for unconditional samples")
    for name, value, low in (("per_class", per_class, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AugmentError(f"{name} must be an integer >= {low}, got {value!r}")
    if output_format not in FORMATS:
        raise AugmentError(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    chosen = list(range(num_classes)) if classes is None else list(classes)
    if not chosen:
        raise AugmentError("classes is empty: give at least one class id (or None for all)")
    bad = [c for c in chosen if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        raise AugmentError(f"class ids must lie in [0, {num_classes}) for this prior, got {bad}")
    if len(set(chosen)) != len(chosen):
        raise AugmentError(f"classes lists a class id more than once: {chosen}")
    return sorted(chosen)


@torch.no_grad()
def augment(prior: CodePrior, tokenizer: VQGAN, out_dir: str | Path, *, per_class: int,
            classes: Sequence[int] | None = None, cfg_scale: float = 2.0, temperature: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, seed: int = 0, batch_size: int = 64,
            output_format: str = "folder", weights_dtype: torch.dtype | None = None, prior_hash: str | None = None,
            progress: bool = True, steps: int | None = None, choice_temperature: float | None = None) -> dict[str, Any]:
    """Write `per_class` samples of each class in `classes` (None: all) to `out_dir` as an image folder
    or webdataset shards, with OUT/augment.json; resumes an earlier run with the same settings.
    `prior_hash` names the prior in the manifest (the CLI passes its model.safetensors sha256; None
    hashes the weights in memory). `steps` and `choice_temperature` are a masked prior's decoding options.
    Returns {"manifest", "written", "skipped", "out"}."""
    classes = _check_run_options(prior, per_class, classes, batch_size, seed, output_format)
    try:
        _check_options(prior, cfg_scale, temperature, top_k, top_p)
    except ValueError as e:
        raise AugmentError(str(e)) from e
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    num_classes = prior.config.num_classes
    names = list(prior.class_names) if prior.class_names else [f"class_{i:03d}" for i in range(num_classes)]
    layout = _Layout(out, output_format, classes, per_class, batch_size, names)
    options = {"per_class": per_class, "classes": classes, "cfg_scale": cfg_scale, "temperature": temperature,
               "top_k": top_k, "top_p": top_p, "seed": seed, "batch_size": batch_size, "format": output_format,
               "weights_dtype": str(weights_dtype or "model")}
    if prior.prior_type == "masked":  # autoregressive runs keep the options they always had (resume)
        options.update({k: v for k, v in decoding_record(prior, steps, choice_temperature).items()
                        if k != "prior_type"})
    hashes = {"prior_hash": prior_hash or prior_content_hash(prior), "tokenizer_hash": tokenizer.content_hash()}

    done = _previous_chunks(out, options, {**hashes, "class_names": names}, layout)
    layout.remove_strays({f for chunk in done.values() for f in layout.files(chunk)})
    manifest = {"format": AUGMENT_FORMAT, "version": AUGMENT_VERSION, "complete": False, "options": options,
                **hashes, "class_names": names, "count": 0, "chunks": [], "images": []}
    if output_format == "folder":
        manifest["folders"] = layout.dirs
        atomic_write_json(out / CLASSES_NAME, layout.dirs)  # every class in id order, so ids match the prior's

    def save(complete: bool) -> None:
        chunks = [done[ck] for ck in layout.chunks() if ck in done]
        manifest.update(complete=complete, count=sum(ch["count"] for ch in chunks),
                        chunks=[{k: v for k, v in ch.items() if k != "images"} for ch in chunks],
                        images=[record for ch in chunks for record in ch["images"]])
        atomic_write_json(out / AUGMENT_NAME, manifest)
        if output_format == "wds":  # what `wds:` sources read: class names and per-shard counts
            atomic_write_json(out / MANIFEST_NAME, {
                "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": "augment", "complete": complete,
                "count": manifest["count"], "class_names": names, "num_classes": num_classes,
                "shards": [{"name": ch["shard"], "count": ch["count"], "sha256": ch["shard_sha256"]}
                           for ch in chunks]})

    total = len(classes) * per_class
    skipped = sum(ch["count"] for ch in done.values())
    device = next(prior.parameters()).device
    bar = tqdm(total=total, initial=skipped, unit="img", desc="augment", disable=not progress)
    for c, k in layout.chunks():
        if (c, k) in done:
            continue
        count, chunk_rng_seed = layout.count(k), chunk_seed(seed, c, k)
        generator = torch.Generator(device="cpu").manual_seed(chunk_rng_seed)
        labels = torch.full((count,), c, dtype=torch.long, device=device)
        codes = generate(prior, labels=labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=generator, weights_dtype=weights_dtype, steps=steps,
                         choice_temperature=choice_temperature)
        images = tokenizer.decode(codes).cpu()                             # (count, 3, H, W) in [-1, 1]
        done[(c, k)] = _write_chunk(out, layout, c, k, chunk_rng_seed, images, hashes, options)
        save(complete=False)
        bar.update(count)
    bar.close()
    save(complete=True)
    return {"manifest": manifest, "written": total - skipped, "skipped": skipped, "out": str(out)}


def _write_chunk(out: Path, layout: _Layout, c: int, k: int, rng_seed: int, images: torch.Tensor,
                 hashes: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """Write one chunk's images; -> its manifest record with one record per image."""
    name = layout.class_names[c]
    chunk: dict[str, Any] = {"class": c, "chunk": k, "seed": rng_seed, "count": len(images)}
    records, entries = [], []
    for i, image in enumerate(images):
        index = k * layout.batch_size + i
        data = _png_bytes(image)
        record = {"class": c, "class_name": name, "chunk": k, "chunk_seed": rng_seed, "index_in_chunk": i,
                  "index": index,
                  "sha256": _sha256(data)}
        if layout.format == "folder":
            record = {"file": layout.image_file(c, index), **record}
            atomic_write_bytes(out / record["file"], data)
        else:
            key = layout.key(c, index)
            record = {"shard": layout.shard(c, k), "key": key, **record}
            meta = {"label": c, "class_name": name, "index": index, "chunk_seed": rng_seed, "source": "augment",
                    **{o: options[o] for o in ("seed", "cfg_scale", "temperature", "top_k", "top_p")}, **hashes}
            entries += sorted([(f"{key}.png", data), (f"{key}.cls", str(c).encode("ascii")),
                               (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))])
        records.append(record)
    if layout.format == "wds":
        path = out / layout.shard(c, k)
        write_shard(path, entries)
        chunk.update(shard=path.name, shard_sha256=sha256_file(path))
    chunk["images"] = records
    return chunk


def wds_spec(out_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The `wds:` data spec that reads a finished wds augment run."""
    last = len(manifest["chunks"]) - 1
    return f"wds:{Path(out_dir) / f'shard-{{000000..{last:06d}}}.tar'}"
