"""The learning-rate schedule both training loops use (nanoGPT's `get_lr`)."""
from __future__ import annotations

import math


def warmup_lr(step: int, base_lr: float, *, warmup_steps: int, total_steps: int, min_lr_ratio: float,
              schedule: str = "cosine") -> float:
    """Linear warm-up to base_lr, then constant or cosine decay to min_lr_ratio * base_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))
