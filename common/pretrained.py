"""Strict loading of `save_pretrained` directories (config.json + model.safetensors), shared by
the tokenizer and the priors: every mismatch is an error that names the file and what was expected."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def read_pretrained_config(directory: Path, config_name: str, model_type: str, error: type[Exception]) -> dict:
    """The parsed config.json of a pretrained directory, checked for its `model_type`."""
    config_path = directory / config_name
    if not directory.is_dir():
        raise error(f"{model_type} directory {directory} does not exist")
    if not config_path.is_file():
        raise error(f"{config_path} is missing: expected the JSON config written by save_pretrained")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("model_type") != model_type or "config" not in meta:
        raise error(f"{config_path}: expected an object with model_type={model_type!r} and a 'config' section")
    return meta


def load_strict_state(model: torch.nn.Module, weights_path: Path, config_path: Path, error: type[Exception]) -> None:
    """Load safetensors weights into `model` with strict=True, after checking keys and shapes
    so that a mismatch says which keys and shapes differ."""
    if not weights_path.is_file():
        raise error(f"{weights_path} is missing: expected the safetensors weights")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise error(f"{weights_path} is not a readable safetensors file: {e}") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing[:8]}" if missing else "",
                 f"unexpected keys {unexpected[:8]}" if unexpected else "",
                 f"wrong shapes {wrong[:8]}" if wrong else ""]
        raise error(f"{weights_path} does not match {config_path}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)
