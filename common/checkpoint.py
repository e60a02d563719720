"""Training checkpoints shared by every loop: find the one to resume, save one atomically, and
cut the per-step log back to the resumed step.

The state itself goes through `accelerator.save_state` into `OUT/checkpoints/.tmp_step_N`, which
is renamed to `step_N` only once every process has written its part, so a kill at any moment
leaves the previous checkpoint intact. Imports none of the project's packages.

Several machines may share OUT (one network filesystem) or each have their own disk. Each save
first finds out which (`_out_dir_is_shared`): shared, the main process alone manages the
directory, as on one machine; not shared, every machine keeps a whole checkpoint of its own
(Accelerate's `save_on_each_node`: weights, optimizer and registered objects written by each
machine's first process, the RNG state of each process on its machine) and that first process
renames and prunes it. On resume every process must find the same step (`find_checkpoint`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from common.io import atomic_write_text


def find_checkpoint(out_dir: str | Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint under out_dir (None if there is none); else a path.

    Under torch.distributed every process must call it (with the same `resume`): the processes
    compare what they found, and a disagreement (machines with their own disks holding different
    checkpoints, a path missing on one machine) is an error on all of them rather than a hang or
    a silent mix of steps."""
    if resume is None:
        return None
    found, error = None, None
    if resume != "auto":
        found = Path(resume)
        if not found.is_dir():
            error = f"--resume {resume}: no such checkpoint directory"
    else:
        complete = _checkpoints(Path(out_dir) / "checkpoints")
        found = complete[-1] if complete else None
    answers = _all_gather_objects((found.name if found is not None else None, error))
    errors = [f"process {rank}: {err}" for rank, (_, err) in enumerate(answers) if err]
    if errors:
        raise FileNotFoundError("; ".join(errors))
    if len({name for name, _ in answers}) > 1:
        seen = ", ".join(f"process {rank}: {name or 'no checkpoint'}" for rank, (name, _) in enumerate(answers))
        raise RuntimeError(f"the processes found different checkpoints to resume from ({seen}) under "
                           f"{out_dir}/checkpoints. Each machine without a shared out_dir keeps its own copy; "
                           f"copy the missing one over or delete the newer ones so that every machine holds "
                           f"the same latest step")
    return found


def _all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every process in rank order (torch.distributed), or [obj] when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (`step_N`, not `.tmp_step_N`), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if re.fullmatch(r"step_\d+", p.name))


def save_checkpoint(accelerator: Any, out_dir: str | Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary directory renamed to `checkpoints/step_N`; keeps
    the newest `keep` checkpoints. Every process must call it (it synchronises them). Works with
    OUT on one filesystem shared by all machines or on each machine's own disk (module docstring)."""
    ckpt_root = Path(out_dir) / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:08d}", ckpt_root / f".tmp_step_{step:08d}"
    shared = _out_dir_is_shared(accelerator, ckpt_root)
    # the one process that manages this disk's copy: the main one, or each machine's first
    manager = accelerator.is_main_process if shared else accelerator.is_local_main_process
    project = accelerator.project_configuration
    save_on_each_node = project.save_on_each_node
    project.save_on_each_node = not shared  # each disk gets the weights, optimizer and registered objects
    try:
        if manager:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if manager:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a kill before this line leaves the previous checkpoint intact
            for path in _checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
                shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
    finally:
        project.save_on_each_node = save_on_each_node
    return final


def _out_dir_is_shared(accelerator: Any, ckpt_root: Path) -> bool:
    """Whether every machine sees one `ckpt_root` (a shared filesystem) rather than its own disk.

    Each machine's first process creates a marker file with a fresh name and looks for the others'
    (fresh names: a network filesystem cannot answer from a stale cache). Seeing all of them means
    shared, seeing only its own means separate disks; a mix (some machines sharing) is an error.
    The processes of one machine are taken to share its disk."""
    if accelerator.num_processes == 1:
        return True
    first = accelerator.is_local_main_process
    answers = _all_gather_objects((uuid.uuid4().hex, accelerator.process_index if first else None))
    token = answers[0][0]  # the main process's
    machines = [rank for _, rank in answers if rank is not None]
    marker = ckpt_root / f".machine-{token}-{accelerator.process_index}"
    if first:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        marker.touch()
    accelerator.wait_for_everyone()
    seen = sum((ckpt_root / f".machine-{token}-{rank}").exists() for rank in machines) if first else None
    counts = [n for n in _all_gather_objects(seen) if n is not None]  # every look is done once this returns
    if first:
        marker.unlink()
    if all(n == len(machines) for n in counts):
        return True
    if all(n == 1 for n in counts):
        return False
    raise RuntimeError(f"{ckpt_root} is shared by some machines but not by others (each machine's first process "
                       f"saw {counts} of the {len(machines)} machines' marker files): put train.out_dir on one "
                       f"filesystem every machine mounts, or on a disk of each machine's own")


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop JSON-lines records past `step` (and any line cut short by a kill), so a resumed run's log
    reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class TrainState:
    """The step counter, saved with the rest of the training state (`register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def update_ema(ema: Any, model: Any, decay: float) -> None:
    """DiT's EMA step: ema = decay * ema + (1 - decay) * model for parameters; buffers copied."""
    import torch

    with torch.no_grad():
        for ema_p, p in zip(ema.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(ema.buffers(), model.buffers()):
            ema_b.copy_(b)
