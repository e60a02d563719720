"""The one `Accelerator` both training loops build, and the small collectives they share.

`accelerate launch --multi_gpu --num_machines N ...` (and plain `torchrun --nnodes N ...`) start
one process per device with RANK / WORLD_SIZE / LOCAL_RANK set. On a machine without a GPU,
Accelerate then finds no device backend and quietly runs every process as a lone single-process
job (`DistributedType.NO`): it picks gloo only when asked for the CPU. `build_accelerator` asks
for it exactly then, so the same launch command trains over gloo on CPU-only machines (CI, a
CPU cluster) and over NCCL on GPUs. Imports none of the project's packages.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from accelerate import Accelerator


def launched_world_size() -> int:
    """The number of processes a torchrun-style launcher started (WORLD_SIZE), 1 when not launched."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _has_device_backend() -> bool:
    """Whether torch sees a device Accelerate has a collective backend for (CUDA, XPU, NPU, ...).
    MPS has none: Accelerate runs it single-process, so it counts as no device here."""
    accelerator_api = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator_api is not None and accelerator_api.is_available():
        device = accelerator_api.current_accelerator()
        return device is not None and device.type not in ("cpu", "mps")
    return torch.cuda.is_available()


def use_cpu_backend() -> bool:
    """True when several processes were launched but there is no device to run them on: they
    must be told to use the CPU, or Accelerate would run each as an independent job."""
    return launched_world_size() > 1 and not _has_device_backend()


def build_accelerator(out_dir: str | Path, *, mixed_precision: str, seed: int, **kwargs: Any) -> "Accelerator":
    """The training loops' Accelerator: TensorBoard under OUT/logs, Accelerate's seeded sampler
    (process p gets the p-th of each run of num_processes consecutive batches), gloo on CPU-only
    multi-process launches. `kwargs` go to `Accelerator` unchanged."""
    from accelerate import Accelerator  # here, not at the top: the losses import this module too
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    out_dir = Path(out_dir)
    cpu = kwargs.pop("cpu", False) or use_cpu_backend()
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        # split_batches stays False: a config's batch_size is per process
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        **kwargs,
    )


def distributed_world_size() -> int:
    """Processes in the initialised torch.distributed group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `tensor` over all processes (one all-reduce); `tensor` itself
    when not distributed. Every process must call it with the same shape."""
    world_size = distributed_world_size()
    if world_size == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / world_size


def mean_scalars(logs: Mapping[str, torch.Tensor | float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Log scalars averaged over processes with one all-reduce of their stacked values, so a
    curve logged by the main process is the global one. Every process must pass the same keys."""
    keys = sorted(logs)  # the same order on every process, whatever order each filled its dict in
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device).detach().reshape(())
                           for k in keys])
    means = dict(zip(keys, mean_over_processes(stacked).tolist()))
    return {k: means[k] for k in logs}
