"""Either prior type from a config or a checkpoint: the checkpoint's `prior_type` picks the class."""
from __future__ import annotations

from pathlib import Path

import torch

from common.pretrained import read_pretrained_config
from stage2_prior.masked import MaskedPrior
from stage2_prior.model import CONFIG_NAME, MODEL_TYPE, PRIOR_TYPES, CodePrior, GPTPrior, PriorConfig, PriorLoadError

PRIOR_CLASSES: dict[str, type[CodePrior]] = {"ar": GPTPrior, "masked": MaskedPrior}
assert set(PRIOR_CLASSES) == set(PRIOR_TYPES)


def build_prior(config: PriorConfig) -> CodePrior:
    """A freshly initialised prior of `config.prior_type`."""
    return PRIOR_CLASSES[config.prior_type](config)


def load_prior(directory: str | Path, *, tokenizer_hash: str | None = None,
               device: str | torch.device = "cpu") -> CodePrior:
    """Load a prior of either type written by `save_pretrained`; see `CodePrior.from_pretrained`."""
    meta = read_pretrained_config(Path(directory), CONFIG_NAME, MODEL_TYPE, PriorLoadError)
    config = meta.get("config")
    prior_type = config.get("prior_type", "ar") if isinstance(config, dict) else "ar"
    if prior_type not in PRIOR_CLASSES:
        raise PriorLoadError(f"{Path(directory) / CONFIG_NAME}: prior_type {prior_type!r} is not supported; "
                             f"expected one of {list(PRIOR_CLASSES)}")
    return PRIOR_CLASSES[prior_type].from_pretrained(directory, tokenizer_hash=tokenizer_hash, device=device)
