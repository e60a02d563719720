"""Training checkpoints shared by every loop: find the one to resume, save one atomically, and
cut the per-step log back to the resumed step.

The state itself goes through `accelerator.save_state` into `OUT/checkpoints/.tmp_step_N`, which
is renamed to `step_N` only once every process has written its part, so a kill at any moment
leaves the previous checkpoint intact. Imports none of the project's packages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from common.io import atomic_write_text


def find_checkpoint(out_dir: str | Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint under out_dir (None if there is none); else a path."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
        return path
    ckpt_root = Path(out_dir) / "checkpoints"
    found = _checkpoints(ckpt_root)
    return found[-1] if found else None


def _checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (`step_N`, not `.tmp_step_N`), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if re.fullmatch(r"step_\d+", p.name))


def save_checkpoint(accelerator: Any, out_dir: str | Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a temporary directory renamed to `checkpoints/step_N`; keeps
    the newest `keep` checkpoints. Every process must call it (it synchronises them)."""
    ckpt_root = Path(out_dir) / "checkpoints"
    final, tmp = ckpt_root / f"step_{step:08d}", ckpt_root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a kill before this line leaves the previous checkpoint intact
        for path in _checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
