"""Bad input, one channel: the data package's error type and how unreadable items are skipped.

`DataSourceError` is for what makes a source unusable (a wrong spec, an empty dataset, a missing
column); `record_skip` is for single bad items (a corrupt JPEG, a truncated shard), which are
skipped and counted, never fatal. Skips are recorded per process in `dataset.skipped_files` and,
when a training loop sets `dataset.skip_log`, appended to one file per process in that directory,
so skips inside DataLoader workers and other ranks reach the main process (`read_skip_log`).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
MAX_CONSECUTIVE_FAILURES = 100  # beyond this the data itself is broken, not a stray file


class DataSourceError(ValueError):
    """A data spec, option or image folder cannot be turned into a dataset; the message names
    the spec or path and what was expected."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())  # the log format is one `what<TAB>reason` line per skip


def record_skip(dataset: Any, what: str, reason: str) -> None:
    """Log one warning for a skipped item, append `what` to `dataset.skipped_files` and, when
    `dataset.skip_log` is a directory, a `what<TAB>reason` line to its `HOST-PID.txt`."""
    logging.getLogger(type(dataset).__module__).warning("skipping unreadable %s (%s)", what, reason)
    if getattr(dataset, "skipped_files", None) is None:
        dataset.skipped_files = []
    dataset.skipped_files.append(what)
    skip_log = getattr(dataset, "skip_log", None)
    if skip_log is not None:
        directory = Path(skip_log)
        directory.mkdir(parents=True, exist_ok=True)
        # one small append per call: O_APPEND writes of one line are not interleaved
        with open(directory / f"{socket.gethostname()}-{os.getpid()}.txt", "a", encoding="utf-8") as f:
            f.write(f"{_one_line(what)}\t{_one_line(reason)}\n")


def read_skip_log(directory: str | Path) -> list[tuple[str, str]]:
    """Every `(what, reason)` recorded under `directory` by any process, file by file in name
    order; an absent directory means nothing was skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    entries: list[tuple[str, str]] = []
    for path in sorted(directory.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            what, _, reason = line.partition("\t")
            if what:
                entries.append((what, reason))
    return entries


def load_or_next(dataset: Any, index: int, load: Callable[[int], T], describe: Callable[[int], str],
                 source: str) -> T:
    """`load(index)`, or when that item is unreadable the next loadable one (wrapping around), so
    one bad file never stops an epoch. Failures are recorded once each with `record_skip` and
    remembered in `dataset._bad`; `source` names the dataset in the error raised when
    MAX_CONSECUTIVE_FAILURES items in a row fail."""
    n = len(dataset)
    if not -n <= index < n:
        raise IndexError(f"{type(dataset).__name__} index {index} out of range for {n} items")
    index %= n
    bad: set[int] = dataset.__dict__.setdefault("_bad", set())
    tries = min(n, MAX_CONSECUTIVE_FAILURES)
    for attempt in range(tries):
        i = (index + attempt) % n
        if i in bad:
            continue
        try:
            return load(i)
        except Exception as e:  # any decoder error (OSError, SyntaxError, zlib.error, ...) means a bad file
            bad.add(i)
            record_skip(dataset, describe(i), f"{type(e).__name__}: {e}")
    skipped = getattr(dataset, "skipped_files", None) or ["?"]
    raise DataSourceError(
        f"{source}: {tries} consecutive images from index {index} failed to load ({len(skipped)} unreadable "
        f"so far, e.g. {skipped[-1]}); is this an image dataset?")
