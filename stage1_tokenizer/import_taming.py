"""Import a taming-transformers VQGAN checkpoint (Esser et al. 2021) as this project's tokenizer.

taming's `VQModel` is an Encoder/Decoder from `taming/modules/diffusionmodules/model.py`, a
`VectorQuantizer2` (un-normalised codebook, beta 0.25 on the codebook term: `legacy=True`) and
1x1 `quant_conv` / `post_quant_conv`; `stage1_tokenizer.layers` uses its module names, so the
weights map key for key. The checkpoint is read with `torch.load(weights_only=True)`: no code
from the file runs. Options this tokenizer cannot reproduce exactly are refused by name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from common import ConfigError
from stage1_tokenizer.import_common import read_state_dict
from stage1_tokenizer.model import VQGAN, VQGANConfig
from stage1_tokenizer.quantize import QuantizerConfig

SUPPORTED_TARGETS = ("taming.models.vqgan.VQModel", "taming.models.vqgan.VQNoDiscModel")
_REFUSED_TARGETS = {
    "GumbelVQ": "its Gumbel-softmax quantizer (a 1x1 projection to logits) has no counterpart here",
    "EMAVQ": "its EMA quantizer keeps its codebook under other names",
    "VQSegmentationModel": "it encodes segmentation maps, not images",
}
# ddconfig keys and the only value each may take here (taming's defaults where it has one)
_FIXED_DDCONFIG = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False,
                   "attn_type": "vanilla", "use_linear_attn": False}
_MAPPED_DDCONFIG = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                    "resolution", "z_channels"}
# model.params that do not change the weights or the computation of encode/decode
_IGNORED_PARAMS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor",
                   "sane_index_shape", "scheduler_config"}
_DROPPED_PREFIXES = ("loss.",)   # discriminator and LPIPS weights of the training loss
_DROPPED_KEYS = {"colorize"}     # a random buffer for visualising segmentation maps
# bookkeeping buffers of our quantizer (usage window) that taming does not have: fresh values
_OWN_BUFFERS = {"quantize.step", "quantize.last_used"}
# types found inside Lightning checkpoints as dict keys (callback states); loaded as an inert stub
_LIGHTNING_TYPES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
                    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor")
INFERRED_RESOLUTION = 256


class _LightningType:
    """Stands in for a Lightning class that a checkpoint names (never instantiated)."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning `.ckpt` (its "state_dict") or of a plain `.pt` state dict."""
    return read_state_dict(path, weights_key="state_dict", allowed=[(_LightningType, name) for name in _LIGHTNING_TYPES],
                           what="a Lightning checkpoint")


def config_from_yaml(path: str | Path) -> VQGANConfig:
    """Read a taming YAML config (model.target, model.params.ddconfig / n_embed / embed_dim)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the taming config: {e}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise ConfigError(f"{path}: expected a taming config with model.target and model.params")
    target = str(model.get("target"))
    if target not in SUPPORTED_TARGETS:
        reason = _REFUSED_TARGETS.get(target.rsplit(".", 1)[-1], "it is not a taming VQGAN this importer knows")
        raise ConfigError(f"{path}: model.target={target} is not supported ({reason}); supported: "
                          f"{', '.join(SUPPORTED_TARGETS)}")
    params = model["params"]
    unknown = sorted(set(params) - _IGNORED_PARAMS - {"ddconfig", "n_embed", "embed_dim", "remap"})
    if unknown:
        raise ConfigError(f"{path}: model.params {', '.join(unknown)} not supported by the importer")
    if params.get("remap") is not None:
        raise ConfigError(f"{path}: model.params.remap={params['remap']!r} (remapped code indices) is not supported")
    for name in ("ddconfig", "n_embed", "embed_dim"):
        if name not in params:
            raise ConfigError(f"{path}: model.params.{name} is missing")
    dd = params["ddconfig"]
    unknown = sorted(set(dd) - _MAPPED_DDCONFIG - set(_FIXED_DDCONFIG))
    if unknown:
        raise ConfigError(f"{path}: ddconfig option(s) {', '.join(unknown)} not supported by the importer")
    for name, value in _FIXED_DDCONFIG.items():
        if name in dd and dd[name] != value:
            raise ConfigError(f"{path}: ddconfig.{name}={dd[name]!r} cannot be expressed by this tokenizer "
                              f"(only {value!r})")
    if "double_z" not in dd:  # taming's Encoder defaults to double_z=True, which VQModel cannot run
        raise ConfigError(f"{path}: ddconfig.double_z is not set (taming's default True doubles the encoder "
                          f"output, which VQModel's quant_conv does not take); set double_z: false")
    missing = sorted({"ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                      "z_channels"} - set(dd))
    if missing:
        raise ConfigError(f"{path}: ddconfig is missing {', '.join(missing)}")
    try:
        return _build_config(ch=dd["ch"], ch_mult=dd.get("ch_mult", (1, 2, 4, 8)), num_res_blocks=dd["num_res_blocks"],
                             attn_resolutions=dd["attn_resolutions"], resolution=dd["resolution"],
                             in_channels=dd["in_channels"], out_channels=dd["out_ch"], z_channels=dd["z_channels"],
                             dropout=dd.get("dropout", 0.0), n_embed=params["n_embed"], embed_dim=params["embed_dim"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _build_config(*, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, resolution: int, in_channels: int,
                  out_channels: int, z_channels: int, dropout: float, n_embed: int, embed_dim: int) -> VQGANConfig:
    # taming's quantizer: VectorQuantizer2(n_embed, embed_dim, beta=0.25, legacy=True), raw codebook
    quantizer = QuantizerConfig(type="vq", codebook_size=int(n_embed), code_dim=int(embed_dim), l2_normalize=False,
                                beta=0.25, legacy_beta=True)
    return VQGANConfig(resolution=int(resolution), in_channels=int(in_channels), out_channels=int(out_channels),
                       ch=int(ch), ch_mult=tuple(int(m) for m in ch_mult), num_res_blocks=int(num_res_blocks),
                       attn_resolutions=tuple(int(r) for r in attn_resolutions), z_channels=int(z_channels),
                       dropout=float(dropout), norm_groups=32, quantizer=quantizer)


def infer_config(state: dict[str, torch.Tensor], where: str = "checkpoint") -> VQGANConfig:
    """A VQGANConfig from a taming state dict's tensor shapes. Only which levels hold attention is
    known, not the training resolution: resolution is set to 256 and attn_resolutions to match."""
    if "quantize.embed.weight" in state or "quantize.proj.weight" in state:
        raise ConfigError(f"{where}: holds a Gumbel quantizer (quantize.proj / quantize.embed, taming's GumbelVQ), "
                          f"which this tokenizer cannot express")
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "quantize.embedding.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"{where}: not a taming VQModel state dict (missing {', '.join(missing)}); pass --config")
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    num_res_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    attn_levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))})
    z_channels = state["encoder.conv_out.weight"].shape[0]
    if state["quant_conv.weight"].shape[1] != z_channels:
        raise ConfigError(f"{where}: the encoder outputs {z_channels} channels but quant_conv takes "
                          f"{state['quant_conv.weight'].shape[1]} (double_z?); this cannot be expressed")
    n_embed, embed_dim = state["quantize.embedding.weight"].shape
    resolution = INFERRED_RESOLUTION
    return _build_config(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         attn_resolutions=[resolution // 2 ** i for i in attn_levels], resolution=resolution,
                         in_channels=in_channels, out_channels=state["decoder.conv_out.weight"].shape[0],
                         z_channels=z_channels, dropout=0.0, n_embed=n_embed, embed_dim=embed_dim)


def map_state_dict(state: dict[str, torch.Tensor], model: VQGAN, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """taming keys -> this model's keys: loss.* dropped, anything unexpected or missing refused by name."""
    own = model.state_dict()
    mapped = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED_KEYS}
    unexpected = sorted(set(mapped) - set(own) | (set(mapped) & _OWN_BUFFERS))
    if unexpected:
        raise ConfigError(f"{where}: key(s) this tokenizer cannot express: {', '.join(unexpected[:10])}"
                          + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    missing = sorted(set(own) - set(mapped) - _OWN_BUFFERS)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing[:10])}"
                          + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in mapped.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{where}: tensor shapes do not match the config: {', '.join(wrong[:5])}")
    return {**{k: own[k] for k in _OWN_BUFFERS}, **{k: v.to(own[k].dtype) for k, v in mapped.items()}}


def import_taming(checkpoint: str | Path, config: str | Path | None = None) -> VQGAN:
    """A taming VQModel checkpoint (+ its YAML config, else shapes are inferred) as a VQGAN in eval mode."""
    state = read_checkpoint(checkpoint)
    where = str(checkpoint)
    vq_config = config_from_yaml(config) if config is not None else infer_config(state, where)
    model = VQGAN(vq_config)
    model.load_state_dict(map_state_dict(state, model, where), strict=True)
    return model.eval()


def describe(model: VQGAN) -> dict[str, Any]:
    """A short summary for the CLI: factor, code grid at the config's resolution, codebook."""
    cfg = model.config
    return {"factor": model.code_factor, "code_grid": model.code_grid(cfg.resolution),
            "codebook": f"{cfg.quantizer.codebook_size} x {cfg.quantizer.code_dim}",
            "parameters": model.num_parameters()}
