"""The clean-up half of `vqgan data collect`: img2dataset's raw shards -> de-duplicated final shards.

Every raw shard is read in shard order and, within it, in key order (img2dataset writes samples in
the order downloads finish), so the images kept do not depend on thread timing or on where a
collection was killed. An image is dropped as

- an exact duplicate when the sha256 of its downloaded bytes (img2dataset's `sha256`) was seen;
- a near duplicate when its perceptual hash (`imagehash.phash`, 64 bits, of the stored image)
  is within `near_dup_distance` bits of a kept image's. Candidates come from a multi-index:
  the hash is cut into distance + 1 bands, and two hashes that close agree exactly on at least
  one band (pigeonhole), so the search stays linear in the number of images.

The per-URL outcome comes from img2dataset's parquet files (status and error message per URL);
`classify` turns those messages into the report's reasons.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image
from tqdm import tqdm

from common import atomic_write_json, sha256_file
from data.pack import shard_name, write_shard
from data.wds import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION

OPT_OUT_MESSAGE = "disallowed by x-robots-tag"
FILTER_MESSAGES = {"image too small": "min_size", "aspect ratio too large": "aspect_ratio"}
HASH_BITS = 64


def classify(status: str | None, error: str | None) -> tuple[str, str | None]:
    """(outcome, reason) of one URL: ("downloaded", None), ("opted_out", None), ("filtered", why) or
    ("failed", why) with why in http_<code>, timeout, undecodable, connection, other."""
    if status == "success":
        return "downloaded", None
    message = (error or "").lower()
    if OPT_OUT_MESSAGE in message:
        return "opted_out", None
    if message in FILTER_MESSAGES:
        return "filtered", FILTER_MESSAGES[message]
    http = re.search(r"http error (\d{3})", message)
    if http:
        return "failed", f"http_{http.group(1)}"
    if "timed out" in message or "timeout" in message:
        return "failed", "timeout"
    if "decoding error" in message or "cannot identify image" in message or "truncated" in message:
        return "failed", "undecodable"
    if any(s in message for s in ("connection", "urlopen error", "remote end closed", "name or service",
                                  "network is unreachable", "reset by peer")):
        return "failed", "connection"
    return "failed", "other"


def _raw_name(shard_id: int) -> str:
    return f"{shard_id:05d}"  # img2dataset's oom_shard_count=5


def _read_outcomes(raw_dir: Path, shard_id: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(raw_dir / f"{_raw_name(shard_id)}.parquet",
                         columns=["key", "url", "status", "error_message"]).to_pylist()


def _read_samples(raw_dir: Path, shard_id: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of one raw tar, in key order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(raw_dir / f"{_raw_name(shard_id)}.tar") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples[key][ext] = tar.extractfile(member).read()
    for key in sorted(samples):
        yield key, samples[key]


class NearDuplicateIndex:
    """Kept perceptual hashes, searchable for any within `distance` bits (see the module docstring)."""

    def __init__(self, distance: int):
        self.distance = distance
        bands = distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self.bands]
        self.hashes: list[int] = []

    def find(self, h: int) -> int | None:
        """Index of a kept hash within the distance, or None."""
        for (shift, mask), table in zip(self.bands, self.tables):
            for i in table.get((h >> shift) & mask, ()):
                if (self.hashes[i] ^ h).bit_count() <= self.distance:
                    return i
        return None

    def add(self, h: int) -> None:
        for (shift, mask), table in zip(self.bands, self.tables):
            table[(h >> shift) & mask].append(len(self.hashes))
        self.hashes.append(h)


def perceptual_hash(image_bytes: bytes) -> int:
    import imagehash

    with Image.open(io.BytesIO(image_bytes)) as image:
        return int(str(imagehash.phash(image.convert("RGB"))), 16)


def _label_index(value: Any, class_names: list[str] | None) -> int:
    if class_names is None or value is None or value != value or value == "":
        return -1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    name = str(value)
    return class_names.index(name) if name in class_names else -1


def clean_collection(raw_dir: Path, out: Path, *, num_raw_shards: int, class_names: list[str] | None,
                     label_col: str | None, near_dup_distance: int, shard_size: int, source: str,
                     progress: bool = True) -> dict[str, Any]:
    """Write the kept images of raw shards 0..num_raw_shards-1 as `out/shard-NNNNNN.tar` with a
    manifest; returns the report (counts per outcome and reason)."""
    # readers must never pair the old manifest with new shards: it goes first and comes back last
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    counts: Counter = Counter()
    failed, filtered, duplicates = Counter(), Counter(), Counter({"exact": 0, "near": 0})
    seen_sha: set[str] = set()
    index = NearDuplicateIndex(near_dup_distance) if near_dup_distance >= 0 else None
    shards: list[dict[str, Any]] = []
    entries: list[tuple[str, bytes]] = []
    in_shard = 0

    def flush() -> None:
        nonlocal entries, in_shard
        path = out / shard_name(len(shards))
        write_shard(path, entries)
        shards.append({"name": path.name, "count": in_shard, "sha256": sha256_file(path)})
        entries, in_shard = [], 0

    for shard_id in tqdm(range(num_raw_shards), unit="shard", desc="clean up", disable=not progress):
        for row in _read_outcomes(raw_dir, shard_id):
            outcome, reason = classify(row["status"], row["error_message"])
            counts[outcome] += 1
            if outcome == "failed":
                failed[reason] += 1
            elif outcome == "filtered":
                filtered[reason] += 1
        for key, sample in _read_samples(raw_dir, shard_id):
            ext = next((e for e in ("jpg", "png", "webp") if e in sample), None)
            if ext is None or "json" not in sample:
                continue
            meta = json.loads(sample["json"])
            if meta.get("sha256") in seen_sha:
                duplicates["exact"] += 1
                continue
            try:
                phash = perceptual_hash(sample[ext])
            except OSError:  # img2dataset re-encoded it, so this is a disk fault, not the web's
                failed["undecodable"] += 1
                counts["downloaded"] -= 1
                counts["failed"] += 1
                continue
            if index is not None and index.find(phash) is not None:
                duplicates["near"] += 1
                continue
            seen_sha.add(meta.get("sha256"))
            if index is not None:
                index.add(phash)
            label = _label_index(meta.get(label_col), class_names) if label_col else -1
            record = {"url": meta.get("url"), "key": key, "sha256": meta.get("sha256"), "phash": f"{phash:016x}",
                      "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
                      "label": label, "class_name": class_names[label] if class_names and label >= 0 else None,
                      "caption": meta.get("caption")}
            sample_entries = [(f"{key}.{ext}", sample[ext]),
                              (f"{key}.json", json.dumps(record, sort_keys=True).encode("utf-8"))]
            if label >= 0:
                sample_entries.append((f"{key}.cls", str(label).encode("ascii")))
            if "txt" in sample:
                sample_entries.append((f"{key}.txt", sample["txt"]))
            entries.extend(sorted(sample_entries))
            in_shard += 1
            if in_shard == shard_size:
                flush()
    if in_shard:
        flush()
    names = {s["name"] for s in shards}
    for stale in out.glob("shard-*.tar*"):  # from an earlier clean-up that kept more images
        if stale.name not in names:
            stale.unlink()

    kept = sum(s["count"] for s in shards)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source, "complete": True,
                "count": kept, "class_names": class_names, "num_classes": len(class_names) if class_names else None,
                "skipped": 0, "skipped_files": [], "shards": shards}
    if kept:
        atomic_write_json(out / MANIFEST_NAME, manifest)
    return {"urls": sum(counts.values()), "downloaded": counts["downloaded"], "failed": dict(sorted(failed.items())),
            "opted_out": counts["opted_out"],
            "filtered": {"min_size": filtered["min_size"], "aspect_ratio": filtered["aspect_ratio"]},
            "duplicates": dict(duplicates), "kept": kept, "shards": [s["name"] for s in shards]}


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table, one reason per line."""
    rows = [("URLs", report["urls"]), ("downloaded", report["downloaded"])]
    rows += [(f"failed: {reason}", n) for reason, n in report["failed"].items()]
    rows += [("opted out (X-Robots-Tag)", report["opted_out"])]
    rows += [(f"filtered: {reason}", n) for reason, n in report["filtered"].items()]
    rows += [(f"duplicate: {kind}", n) for kind, n in report["duplicates"].items()]
    rows += [("kept", report["kept"]), ("shards", len(report["shards"]))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {n:>8}" for name, n in rows)
