"""What every benchmark prints first: versions, threads, load and malloc settings."""
from __future__ import annotations

import os

import torch


def machine_header(busy_load: float = 0.5) -> str:
    """One block naming the conditions of a measurement; warns when the machine is busy."""
    load = os.getloadavg()
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    warn = "  WARNING: machine busy, numbers unreliable" if load[0] > busy_load else ""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{warn}\n"
            f"malloc settings: {malloc or 'glibc defaults'}")
