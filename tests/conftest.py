"""Shared test helpers. Real weights and images that cannot be downloaded here live in
`../shared/assets` (or $VQGAN_ASSETS); tests that need them skip with the reason when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VQGAN_ASSETS") or REPO.parent / "shared" / "assets")


def asset(relative: str) -> Path:
    """Path of an offline asset, or skip the calling test saying which file is missing."""
    path = ASSETS / relative
    if not path.is_file():
        pytest.skip(f"asset {path} is absent (set VQGAN_ASSETS to the folder holding it)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # a fixed thread count keeps float reductions identical run to run
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
