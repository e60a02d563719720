"""What every benchmark prints first: versions, threads, load and malloc settings."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable

import torch


def machine_header(busy_load: float = 0.5) -> str:
    """One block naming the conditions of a measurement; warns when the machine is busy."""
    load = os.getloadavg()
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    warn = "  WARNING: machine busy, numbers unreliable" if load[0] > busy_load else ""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{warn}\n"
            f"malloc settings: {malloc or 'glibc defaults'}")


def native_kernels_line() -> str:
    """Which decode kernels sampling runs on: the package's native ones, or why not (torch's)."""
    from stage2_prior import native_kernels
    parts = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        reason = native_kernels.unavailable_reason(dtype)
        parts.append(f"{name} native" if reason is None else f"{name} torch ({reason.splitlines()[0]})")
    return "decode kernels: " + ", ".join(parts)


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], object] = lambda: None) -> float:
    """Median wall time of `repeats` calls after one warm-up call (allocator, kernels, caches);
    `sync` waits for queued GPU work (torch.cuda.synchronize) before a clock is read."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    """The CUDA allocator's peak, or on a CPU the process's maximum resident set size so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
