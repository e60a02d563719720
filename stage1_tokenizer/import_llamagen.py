"""Import a LlamaGen VQ tokenizer checkpoint (Sun et al. 2024, FoundationVision/LlamaGen) as this project's tokenizer.

LlamaGen's `VQModel` (`tokenizer/tokenizer_image/vq_model.py`) is taming's Encoder/Decoder under other
module names plus a `VectorQuantizer` with an l2-normalised codebook. Mapped onto this tokenizer:

- `conv_blocks[i].res[j]` / `.attn[j]` / `.downsample` -> `down[i].block[j]` / `.attn[j]` / `.downsample`;
  the decoder lists its `conv_blocks` from the lowest resolution up, so `decoder.conv_blocks[k]` is
  `decoder.up[L-1-k]` (taming's order, which `layers.Decoder` keeps).
- `mid[0]`, `mid[1]`, `mid[2]` -> `mid.block_1`, `mid.attn_1`, `mid.block_2`.
- Attention sits after every res block of the lowest-resolution level only: `attn_resolutions` is that
  level's size at the recorded `resolution` (the weights do not say the training resolution; 256 unless given).
- GroupNorm: 32 groups, eps 1e-6, as here; every normalised width must be a multiple of 32 (LlamaGen
  cannot build anything else, while this tokenizer would silently use fewer groups).
- Quantizer: z and the codebook are both l2-normalised before the squared-distance argmin and the
  normalised code is what is decoded (`l2_normalize=True`; `codebook_l2_norm=False` is an option);
  the loss puts beta on the commitment term (`legacy_beta=False`, beta 0.25 as `commit_loss_beta`'s default).
  The usage-window buffer `quantize.codebook_used` is training bookkeeping and is dropped.

The checkpoint is read with `torch.load(weights_only=True)`: no code from the file runs (LlamaGen's training
saves also hold `args`, an `argparse.Namespace`, allowed as a plain attribute container). Anything this
tokenizer cannot reproduce exactly (batch norm, conv shortcuts, resampling without conv, different encoder
and decoder `ch_mult`, unexpected or missing keys, wrong shapes) is refused by name.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from common import ConfigError
from stage1_tokenizer.import_common import read_state_dict
from stage1_tokenizer.model import VQGAN, VQGANConfig
from stage1_tokenizer.quantize import QuantizerConfig

DEFAULT_RESOLUTION = 256   # LlamaGen's VQ-16 / VQ-8 are trained at 256 px
GROUPS = 32                # LlamaGen's Normalize: GroupNorm(32, C, eps=1e-6)
_DROPPED_KEYS = {"quantize.codebook_used"}        # codebook_show_usage's window of recent indices
_OWN_BUFFERS = {"quantize.step", "quantize.last_used"}  # this quantizer's usage bookkeeping: fresh values
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}
_MID_BACK = {v: k for k, v in _MID.items()}
_BATCH_NORM = (".running_mean", ".running_var", ".num_batches_tracked")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a LlamaGen checkpoint: its "model" state dict (or a plain state dict)."""
    return read_state_dict(path, weights_key="model", allowed=[argparse.Namespace], what="a LlamaGen checkpoint")


def _levels(state: dict[str, torch.Tensor], part: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{part}\.conv_blocks\.(\d+)\.", k))}
    return 1 + max(found) if found else 0


def to_own_key(key: str, levels: int) -> str:
    """A LlamaGen state-dict key -> this tokenizer's (unknown keys come back unchanged)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(\d+)\.(.+)", key):
        return f"{m.group(1)}.mid.{_MID[m.group(2)]}.{m.group(3)}" if m.group(2) in _MID else key
    if m := re.fullmatch(r"encoder\.conv_blocks\.(\d+)\.(res|attn|downsample)\.(.+)", key):
        i, kind, rest = m.groups()
        return f"encoder.down.{i}.{'block' if kind == 'res' else kind}.{rest}"
    if m := re.fullmatch(r"decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.(.+)", key):
        k, kind, rest = m.groups()
        if int(k) >= levels:
            return key
        return f"decoder.up.{levels - 1 - int(k)}.{'block' if kind == 'res' else kind}.{rest}"
    return key


def to_llamagen_key(key: str, levels: int) -> str:
    """This tokenizer's state-dict key -> LlamaGen's (the inverse of `to_own_key`)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)", key):
        return f"{m.group(1)}.mid.{_MID_BACK[m.group(2)]}.{m.group(3)}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn|downsample)\.(.+)", key):
        i, kind, rest = m.groups()
        return f"encoder.conv_blocks.{i}.{'res' if kind == 'block' else kind}.{rest}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn|upsample)\.(.+)", key):
        i, kind, rest = m.groups()
        return f"decoder.conv_blocks.{levels - 1 - int(i)}.{'res' if kind == 'block' else kind}.{rest}"
    return key


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def infer_config(state: dict[str, torch.Tensor], where: str = "checkpoint", *, resolution: int = DEFAULT_RESOLUTION,
                 codebook_l2_norm: bool = True) -> VQGANConfig:
    """A VQGANConfig from a LlamaGen state dict's tensor shapes; refuses what cannot be expressed, by name."""
    batch_norm = sorted(k for k in state if k.endswith(_BATCH_NORM))
    if batch_norm:
        raise ConfigError(f"{where}: holds batch-norm statistics ({_listing(batch_norm)}): LlamaGen's "
                          f"norm_type='batch' (SyncBatchNorm) cannot be expressed by this tokenizer (GroupNorm only)")
    shortcut = sorted(k for k in state if ".conv_shortcut." in k)
    if shortcut:
        raise ConfigError(f"{where}: holds 3x3 conv shortcuts ({_listing(shortcut)}): ResnetBlock "
                          f"conv_shortcut=True cannot be expressed by this tokenizer (1x1 nin_shortcut only)")
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "quantize.embedding.weight", "encoder.conv_blocks.0.res.0.conv1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"{where}: not a LlamaGen VQModel state dict (missing {', '.join(missing)})")
    ch, in_channels = (int(n) for n in state["encoder.conv_in.weight"].shape[:2])
    levels, dec_levels = _levels(state, "encoder"), _levels(state, "decoder")

    def level_mult(part: str, i: int) -> int:
        key = f"{part}.conv_blocks.{i}.res.0.conv1.weight"
        if key not in state:
            raise ConfigError(f"{where}: missing key {key}")
        width = int(state[key].shape[0])
        if width % ch:
            raise ConfigError(f"{where}: {key} has {width} output channels, not a multiple of ch={ch}")
        return width // ch

    ch_mult = [level_mult("encoder", i) for i in range(levels)]
    decoder_ch_mult = [level_mult("decoder", k) for k in range(dec_levels)][::-1]
    if decoder_ch_mult != ch_mult:
        raise ConfigError(f"{where}: decoder_ch_mult={decoder_ch_mult} differs from encoder_ch_mult={ch_mult}; "
                          f"this tokenizer's decoder mirrors its encoder")
    for i in range(levels - 1):
        for key in (f"encoder.conv_blocks.{i}.downsample.conv.weight", f"decoder.conv_blocks.{i}.upsample.conv.weight"):
            if key not in state:
                raise ConfigError(f"{where}: missing key {key}: resampling without a conv (resamp_with_conv=False) "
                                  f"cannot be expressed by this tokenizer")
    for width in sorted({ch} | {ch * m for m in ch_mult}):  # the first res block normalises ch channels
        if width % GROUPS:
            raise ConfigError(f"{where}: channel width {width} (ch={ch}, ch_mult={ch_mult}) is not a multiple of "
                              f"LlamaGen's {GROUPS} GroupNorm groups")
    num_res_blocks = 1 + max(int(m.group(1)) for k in state
                             if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
    attn_levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.attn\.", k))})
    z_channels = int(state["encoder.conv_out.weight"].shape[0])
    n_embed, embed_dim = (int(n) for n in state["quantize.embedding.weight"].shape)
    quantizer = QuantizerConfig(type="vq", codebook_size=n_embed, code_dim=embed_dim,
                                l2_normalize=bool(codebook_l2_norm), beta=0.25, legacy_beta=False)
    try:
        return VQGANConfig(resolution=int(resolution), in_channels=in_channels,
                           out_channels=int(state["decoder.conv_out.weight"].shape[0]), ch=ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks,
                           attn_resolutions=tuple(int(resolution) // 2 ** i for i in attn_levels),
                           z_channels=z_channels, dropout=0.0, norm_groups=GROUPS, quantizer=quantizer)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def map_state_dict(state: dict[str, torch.Tensor], model: VQGAN, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """LlamaGen keys -> this model's keys; unexpected, missing or mis-shaped tensors refused by LlamaGen's name."""
    levels = len(model.config.ch_mult)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k not in _DROPPED_KEYS}
    mapped = {to_own_key(k, levels): k for k in kept}
    if len(mapped) != len(kept):  # cannot happen for distinct LlamaGen keys; guards the mapping itself
        raise ConfigError(f"{where}: several keys map onto the same tensor of this tokenizer")
    unexpected = sorted(src for dst, src in mapped.items() if dst not in own or dst in _OWN_BUFFERS)
    if unexpected:
        raise ConfigError(f"{where}: key(s) this tokenizer cannot express: {_listing(unexpected)}")
    missing = sorted(to_llamagen_key(k, levels) for k in set(own) - set(mapped) - _OWN_BUFFERS)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {_listing(missing)}")
    wrong = [f"{src} {tuple(kept[src].shape)} (expected {tuple(own[dst].shape)})" for dst, src in mapped.items()
             if kept[src].shape != own[dst].shape]
    if wrong:
        raise ConfigError(f"{where}: tensor shapes do not match the config: {', '.join(wrong[:5])}")
    return {**{k: own[k] for k in _OWN_BUFFERS}, **{dst: kept[src].to(own[dst].dtype) for dst, src in mapped.items()}}


def import_llamagen(checkpoint: str | Path, *, resolution: int = DEFAULT_RESOLUTION,
                    codebook_l2_norm: bool = True) -> VQGAN:
    """A LlamaGen VQModel checkpoint as a VQGAN in eval mode (shapes inferred from the weights)."""
    state = read_checkpoint(checkpoint)
    where = str(checkpoint)
    model = VQGAN(infer_config(state, where, resolution=resolution, codebook_l2_norm=codebook_l2_norm))
    model.load_state_dict(map_state_dict(state, model, where), strict=True)
    return model.eval()
