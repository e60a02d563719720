"""What the checkpoint importers share: reading another project's checkpoint without running its code."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from common import ConfigError


def read_state_dict(path: str | Path, *, weights_key: str, allowed: list, what: str) -> dict[str, torch.Tensor]:
    """The tensors under `weights_key` of a checkpoint (or a plain state dict), read with
    torch.load(weights_only=True): only tensors, plain containers and the `allowed` globals (harmless
    types named by the caller) load; anything else that needs unpickling is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it needs the Python object {found.group(1)}" if found else f"{type(e).__name__}: {str(e)[:200]}"
        raise ConfigError(f"{path}: cannot be read safely with torch.load(weights_only=True): {reason}; "
                          f"only tensors and plain containers are loaded, arbitrary pickled objects are refused") from None
    state = obj.get(weights_key, obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{path}: expected {what} with a '{weights_key}' state dict of tensors or a plain "
                          f"state dict (name -> tensor)")
    return state
