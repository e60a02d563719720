"""The clean-up half of `vqgan data collect` on its own: reasons from img2dataset's messages, the
near-duplicate index against brute force, and the report table (no download, no img2dataset)."""
from __future__ import annotations

import random

import pytest

from data.collect_clean import HASH_BITS, NearDuplicateIndex, classify, format_report


@pytest.mark.parametrize("status, error, expected", [
    ("success", None, ("downloaded", None)),
    ("failed_to_download", "HTTP Error 404: Not Found", ("failed", "http_404")),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", ("failed", "http_503")),
    ("failed_to_download", "<urlopen error timed out>", ("failed", "timeout")),
    ("failed_to_download", "The read operation timed out", ("failed", "timeout")),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", ("failed", "connection")),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", ("failed", "connection")),
    ("failed_to_download", "Remote end closed connection without response", ("failed", "connection")),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", ("opted_out", None)),
    ("failed_to_resize", "Image decoding error", ("failed", "undecodable")),
    ("failed_to_resize", "image too small", ("filtered", "min_size")),
    ("failed_to_resize", "aspect ratio too large", ("filtered", "aspect_ratio")),
    ("failed_to_download", "hash mismatch", ("failed", "other")),
    ("failed_to_download", None, ("failed", "other")),
])
def test_img2dataset_messages_map_to_report_reasons(status, error, expected):
    assert classify(status, error) == expected


@pytest.mark.parametrize("distance", [0, 1, 4, 10])
def test_near_duplicate_index_finds_what_brute_force_finds(distance):
    rng = random.Random(distance)
    kept: list[int] = []
    index = NearDuplicateIndex(distance)
    for _ in range(400):
        if kept and rng.random() < 0.5:  # a near copy of a kept hash: flip up to distance + 2 bits
            h = rng.choice(kept)
            for bit in rng.sample(range(HASH_BITS), rng.randint(0, distance + 2)):
                h ^= 1 << bit
        else:
            h = rng.getrandbits(HASH_BITS)
        expected = any((h ^ k).bit_count() <= distance for k in kept)
        found = index.find(h)
        assert (found is not None) == expected
        if found is not None:
            assert (index.hashes[found] ^ h).bit_count() <= distance
        else:
            index.add(h)
            kept.append(h)
    assert len(index.hashes) == len(kept)


def test_report_table_lists_every_reason():
    report = {"urls": 10, "downloaded": 6, "failed": {"http_404": 2, "timeout": 1}, "opted_out": 1,
              "filtered": {"min_size": 0, "aspect_ratio": 0}, "duplicates": {"exact": 1, "near": 1},
              "kept": 4, "shards": ["shard-000000.tar"]}
    lines = format_report(report).splitlines()
    assert [line.split()[-1] for line in lines] == ["10", "6", "2", "1", "1", "0", "0", "1", "1", "4", "1"]
    assert lines[2].startswith("failed: http_404") and lines[-2].startswith("kept")
