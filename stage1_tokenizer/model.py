"""The VQGAN tokenizer: images -> grid of discrete codes -> images.

Public API (everything later stages may use): `VQGAN.encode`, `VQGAN.decode`, `VQGAN.forward`,
`save_pretrained` / `from_pretrained` (safetensors + config.json, no training code needed),
`content_hash`, and the code-grid description `code_grid(image_size)` / `code_depth` /
`vocab_sizes`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from common import ConfigError, atomic_dir, config_from_dict, config_to_dict
from common.pretrained import load_strict_state, read_pretrained_config
from stage1_tokenizer.layers import Decoder, Encoder
from stage1_tokenizer.quantize import QuantizerConfig, QuantizerOutput
from stage1_tokenizer.quantizers import build_quantizer

# quantizer options that came with the quantizer family (format 1 had only vq's); see content_hash
LATER_QUANTIZER_FIELDS = ("levels", "depth", "shared_codebook", "quantize_dropout", "lfq_entropy_weight",
                          "lfq_diversity_gamma", "lfq_inv_temperature")
_QUANTIZER_DEFAULTS = config_to_dict(QuantizerConfig())

MODEL_TYPE = "vqgan-tokenizer"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VQGANConfig:
    resolution: int = 256                       # training resolution; decides where attention sits
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # f = 2 ** (len - 1): this default is taming's f16
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if self.resolution % self.downsample_factor:
            raise ValueError(f"model.resolution={self.resolution} is not divisible by the "
                             f"down-sampling factor {self.downsample_factor} of ch_mult={list(self.ch_mult)}")
        if self.quantizer.type == "vqvae2" and self.resolution % (2 * self.downsample_factor):
            raise ValueError(f"model.resolution={self.resolution}: the vqvae2 quantizer's top level halves the "
                             f"{self.resolution // self.downsample_factor}-wide latent grid, which must be even")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % min(self.norm_groups, width):
                raise ValueError(f"model.norm_groups={self.norm_groups} does not divide channel width {width}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class TokenizerLoadError(ValueError):
    """A pretrained tokenizer directory is missing, malformed or does not match its config."""


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        arch = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    attn_resolutions=config.attn_resolutions, resolution=config.resolution,
                    z_channels=config.z_channels, dropout=config.dropout, norm_groups=config.norm_groups)
        self.encoder = Encoder(in_channels=config.in_channels, **arch)
        self.decoder = Decoder(out_channels=config.out_channels, **arch)
        self.quantize = build_quantizer(config.quantizer)
        code_dim = self.quantize.latent_dim
        # 1x1 projections into / out of the (low-dimensional) code space: factorised codes
        self.quant_conv = nn.Conv2d(config.z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, config.z_channels, 1)

    # ---- description of the code grid, read by data, stage 2 and eval -------------------------
    def code_grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the code grid for images of this size."""
        H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.code_factor
        if H % f or W % f:
            raise ValueError(f"image size {H}x{W} is not divisible by the tokenizer's factor {f}")
        return H // f, W // f

    @property
    def code_factor(self) -> int:
        """Pixels per code position along each side (the encoder's factor times the quantizer's)."""
        return self.config.downsample_factor * self.quantize.grid_factor

    @property
    def code_depth(self) -> int:
        """Codes per grid position (1 for vq, fsq, lfq; the depth for rvq)."""
        return self.quantize.code_depth

    @property
    def vocab_sizes(self) -> list[int]:
        """Vocabulary of each code level."""
        return list(self.quantize.vocab_sizes)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where taming's adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    # ---- encode / decode --------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> pre-quantization latents (B, code_dim, h, w)."""
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """quantized latents (B, code_dim, h, w) -> images (B, 3, H, W), not clamped."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64, or (B, h, w, D) with D levels."""
        return self.quantize.encode(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int (or (B, h, w, D) with D levels) -> images (B, 3, H, W) in [-1, 1]."""
        D = self.code_depth
        if codes.dim() != (3 if D == 1 else 4) or (D > 1 and codes.shape[-1] != D):
            expected = "(B, h, w)" if D == 1 else f"(B, h, w, {D})"
            raise ValueError(f"codes must have shape {expected} for this tokenizer, got {tuple(codes.shape)}")
        limits = torch.tensor(self.vocab_sizes, device=codes.device)  # broadcasts over the level axis
        if codes.numel() and ((codes < 0).any() or (codes >= (limits if D > 1 else limits[0])).any()):
            raise ValueError(f"codes must lie in [0, K) for vocab_sizes {self.vocab_sizes}, got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        z_q = self.quantize.codes_to_latents(codes.long()).to(self.post_quant_conv.weight.dtype)
        return self.decode_latents(z_q).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """images -> (reconstruction (B, 3, H, W), quantizer output with losses and stats)."""
        quant = self.quantize(self.encode_latents(images))
        return self.decode_latents(quant.z_q), quant

    # ---- save / load ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION,
                "config": config_to_dict(self.config)}

    def content_hash(self) -> str:
        """sha256 over the config and every tensor: names the exact tokenizer that made codes.

        Quantizer options added after the first format are left out while they hold their defaults,
        so a tokenizer saved before they existed keeps its hash (and the priors trained on its codes
        still load)."""
        hashed = self.config_dict()
        quantizer = hashed["config"]["quantizer"]
        for name in LATER_QUANTIZER_FIELDS:
            if name in quantizer and quantizer[name] == _QUANTIZER_DEFAULTS[name]:
                del quantizer[name]
        digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors atomically; returns the directory."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"model_type": MODEL_TYPE})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VQGAN":
        """Load a directory written by `save_pretrained`; every mismatch is a TokenizerLoadError."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        meta = read_pretrained_config(directory, CONFIG_NAME, MODEL_TYPE, TokenizerLoadError)
        try:
            config = config_from_dict(VQGANConfig, meta["config"], where=str(config_path))
        except ConfigError as e:
            raise TokenizerLoadError(str(e)) from e
        model = cls(config)
        saved_type = _saved_quantizer_type(weights_path)
        if saved_type is not None and saved_type != config.quantizer.type:
            raise TokenizerLoadError(f"{weights_path} holds the weights of a {saved_type!r} quantizer, but {config_path} "
                                     f"sets quantizer.type={config.quantizer.type!r}: a checkpoint loads only as the "
                                     f"quantizer type it was trained with")
        load_strict_state(model, weights_path, config_path, TokenizerLoadError)
        return model.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _saved_quantizer_type(weights_path: Path) -> str | None:
    """The quantizer family whose weights a tokenizer file holds, from its tensor names (None: unknown)."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # unreadable files get load_strict_state's fuller message
        return None
    for prefix, kind in (("quantize.top.", "vqvae2"), ("quantize.embedding.", "vq"), ("quantize.rvq.", "rvq"), ("quantize.lfq.", "lfq")):
        if any(k.startswith(prefix) for k in keys):
            return kind
    return "fsq" if "quantize.window.step" in keys else None
