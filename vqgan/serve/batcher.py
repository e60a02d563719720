"""Dynamic batching: one worker thread owns the models and merges concurrent generate requests.

Requests wait in a bounded queue (full: `QueueFull`, answered 503 with Retry-After). The worker takes
one, then waits up to `max_wait_s` for more until `max_batch` images are gathered; it groups them
by sampling options and runs one KV-cached `generate` call per group of up to `max_batch` rows.

Determinism (a request's images never depend on what it was batched with):
- every row draws its random numbers from its own generator seeded with the image's seed;
- every call runs at one fixed shape, `max_batch` rows (padding rows are dropped after), so the
  matmul kernels and their blocking never change with the number of requests merged;
- images are decoded one at a time, for the same reason.
Other model work (encode, decode, edits) goes through the same queue as a `call`, so the models are
only ever touched from the worker thread (the sampler's decoder cache is not thread-safe).
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stage1_tokenizer import VQGAN
from stage2_prior.model import GPTPrior
from stage2_prior.masked_sample import decoding_options
from stage2_prior.sample import generate
from vqgan.serve.images import b64, grey_from_row, grey_positions, png_bytes


@dataclass(frozen=True)
class Sampling:
    """Options that must be equal for requests to share one `generate` call."""
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None                 # masked priors: decoding passes and confidence noise
    choice_temperature: float | None = None


@dataclass(eq=False)
class GenerateJob:
    """One request: `len(seeds)` images of class `label` (None = unconditional), image i from seed i.

    With `on_partial`, the worker calls it with a dict (rows, of, png, ms) every `every_rows` code
    rows; for a masked prior (step, of, png, ms) every `every_rows` decoding steps, positions not yet
    decoded in grey. `future` resolves to the list of PNG bytes."""
    label: int | None
    seeds: list[int]
    sampling: Sampling
    every_rows: int = 0
    on_partial: Callable[[dict], None] | None = None
    received: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    first_partial_s: float | None = None
    gone: bool = False                      # set when a streaming client disconnects: stop sending partials
    pngs: list[bytes | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pngs = [None] * len(self.seeds)

    @property
    def key(self) -> tuple:
        return (self.sampling, self.label is None)


@dataclass(eq=False)
class CallJob:
    """Any other model work: `fn()` runs on the worker thread; `future` resolves to its result."""
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class QueueFull(Exception):
    """The request queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (request queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, prior: GPTPrior, tokenizer: VQGAN, *, max_batch: int = 16, max_wait_s: float = 0.01,
                 queue_size: int = 64):
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, queue_size >= 1, max_wait >= 0; got {max_batch}, "
                             f"{queue_size}, {max_wait_s}")
        self.prior, self.tokenizer = prior, tokenizer
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.device = prior.level_offsets.device
        self.grid = tuple(prior.code_shape[:2])                 # (h, w) code positions
        self.row_tokens = prior.config.seq_len // self.grid[0]  # tokens per code row (w * D)
        self.calls: deque = deque(maxlen=256)                   # requests per generate call, newest last
        self.seconds_per_call = 0.0                             # running mean, for Retry-After
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- called from the event loop ---------------------------------------------------------
    def submit(self, job: GenerateJob | CallJob) -> Future:
        """Queue a job; raises QueueFull when the queue is full, RuntimeError when stopped."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the model worker is not running")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        return self.submit(CallJob(fn))

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the mean time of a generate call."""
        waiting_calls = self.queue.qsize() / self.max_batch + 1
        return max(1, math.ceil(self.seconds_per_call * waiting_calls))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="vqgan-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, fail whatever is still queued, join the worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    # ---- the worker thread ------------------------------------------------------------------
    def _take(self, wait: float | None) -> GenerateJob | CallJob | None:
        """The next job not cancelled while it waited; None after `wait` seconds (None: until stopped)."""
        deadline = None if wait is None else time.perf_counter() + wait
        while True:
            if deadline is None and self._stop.is_set():
                return None
            timeout = 0.1 if deadline is None else deadline - time.perf_counter()
            try:
                job = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                if deadline is None:
                    continue
                return None
            if job.future.set_running_or_notify_cancel():  # False: cancelled, the client went away
                return job

    def _loop(self) -> None:
        pending: CallJob | None = None
        while not self._stop.is_set() or pending is not None:
            job = pending or self._take(None)
            pending = None
            if job is None:
                continue
            if isinstance(job, CallJob):
                self._run_call(job)
                continue
            batch, rows = [job], len(job.seeds)
            deadline = time.perf_counter() + self.max_wait_s
            while rows < self.max_batch and len(batch) < self.max_batch:
                more = self._take(max(0.0, deadline - time.perf_counter()))
                if more is None:
                    break
                if isinstance(more, CallJob):  # runs right after this batch, keeping arrival order
                    pending = more
                    break
                batch.append(more)
                rows += len(more.seeds)
            self._run_batch(batch)

    def _run_call(self, job: CallJob) -> None:
        try:
            with torch.inference_mode():
                job.future.set_result(job.fn())
        except Exception as e:  # the request gets the error; the worker lives on
            job.future.set_exception(e)

    def _run_batch(self, batch: list[GenerateJob]) -> None:
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        for jobs in groups.values():
            rows = [(job, i) for job in jobs for i in range(len(job.seeds))]
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                try:
                    self._generate(chunk)
                except Exception as e:  # these requests fail; the worker lives on
                    for job in {job for job, _ in chunk}:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _generate(self, chunk: list[tuple[GenerateJob, int]]) -> None:
        """One `generate` call for rows (job, image index) of one group, padded to max_batch rows."""
        started = time.perf_counter()
        B, pad = self.max_batch, self.max_batch - len(chunk)
        sampling = chunk[0][0].sampling
        conditional = chunk[0][0].label is not None
        seeds = [job.seeds[i] for job, i in chunk] + [0] * pad
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU: the same numbers on any device
        labels = None
        if conditional:
            labels = torch.tensor([job.label for job, _ in chunk] + [0] * pad, device=self.device)
        streaming = [(r, job) for r, (job, _) in enumerate(chunk) if job.on_partial is not None]
        on_step = (lambda t, tokens: self._partials(t, tokens, streaming)) if streaming else None
        with torch.inference_mode():
            codes = generate(self.prior, None if conditional else B, labels=labels, generator=generators,
                             cfg_scale=sampling.cfg_scale if conditional else 1.0, temperature=sampling.temperature,
                             top_k=sampling.top_k, top_p=sampling.top_p, on_step=on_step, steps=sampling.steps,
                             choice_temperature=sampling.choice_temperature)
            for r, (job, i) in enumerate(chunk):
                job.pngs[i] = png_bytes(self.tokenizer.decode(codes[r:r + 1])[0])
        self.calls.append(len({id(job) for job, _ in chunk}))
        elapsed = time.perf_counter() - started
        self.seconds_per_call = elapsed if not self.seconds_per_call else 0.8 * self.seconds_per_call + 0.2 * elapsed
        for job in {job for job, _ in chunk}:
            if all(png is not None for png in job.pngs) and not job.future.done():
                job.future.set_result(list(job.pngs))

    def _partials(self, t: int, tokens: torch.Tensor, streaming: list[tuple[int, GenerateJob]]) -> None:
        """After each full code row: decode the rows so far for every streaming row that wants them."""
        if self.prior.prior_type == "masked":
            self._masked_partials(t, tokens, streaming)
            return
        if (t + 1) % self.row_tokens:
            return
        done, h = (t + 1) // self.row_tokens, self.grid[0]
        for r, job in streaming:
            if done == h or done % job.every_rows or job.gone:
                continue  # the full image comes as the final event
            placeholder = tokens[r:r + 1].clone()
            placeholder[:, t + 1:] = self.prior.level_offsets[self.prior.position_depth[t + 1:]]  # code 0: valid
            image = self.tokenizer.decode(self.prior.unflatten_tokens(placeholder))[0]
            picture = png_bytes(grey_from_row(image, done, self.tokenizer.code_factor))
            now = time.perf_counter()
            if job.first_partial_s is None:
                job.first_partial_s = now - job.received
            try:
                job.on_partial({"rows": done, "of": h, "png": b64(picture),
                                "ms": round(1000 * (now - job.received), 1)})
            except Exception:  # e.g. the event loop has closed: that client only, never the whole batch
                job.gone = True

    def _masked_partials(self, step: int, tokens: torch.Tensor, streaming: list[tuple[int, GenerateJob]]) -> None:
        """After decoding step `step` of a masked prior: the decoded positions, the rest in grey."""
        # decoding ends early when fewer positions than steps are free (all L are free here)
        total = min(self.steps_of(streaming[0][1].sampling), self.prior.seq_len)
        if step + 1 >= total:
            return  # the full image comes as the final event
        for r, job in streaming:
            if (step + 1) % job.every_rows or job.gone:
                continue
            row = tokens[r:r + 1]
            undecided = row == self.prior.mask_token                                    # (1, L)
            placeholder = torch.where(undecided, self.prior.level_offsets[self.prior.position_depth], row)
            image = self.tokenizer.decode(self.prior.unflatten_tokens(placeholder))[0]
            position_undecided = undecided.reshape(1, *self.grid, -1).any(dim=-1)[0]    # (h, w)
            picture = png_bytes(grey_positions(image, position_undecided, self.tokenizer.code_factor))
            now = time.perf_counter()
            if job.first_partial_s is None:
                job.first_partial_s = now - job.received
            try:
                job.on_partial({"step": step + 1, "of": total, "png": b64(picture),
                                "ms": round(1000 * (now - job.received), 1)})
            except Exception:  # e.g. the event loop has closed: that client only, never the whole batch
                job.gone = True

    def steps_of(self, sampling: Sampling) -> int:
        """Decoding passes of a masked prior's generate call with these options."""
        return decoding_options(sampling.steps, sampling.choice_temperature)[0]
