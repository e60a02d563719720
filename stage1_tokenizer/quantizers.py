"""Quantizer families beyond plain VQ, behind the tokenizer's one quantizer interface.

Every quantizer (including `quantize.VectorQuantizer`) is an nn.Module with
- `forward(z (B, C, h, w)) -> QuantizerOutput(z_q, codes, loss, stats)`, straight-through in training;
- `encode(z) -> codes` and `codes_to_latents(codes) -> z_q`, its inverse;
- `latent_dim` (C, the channels the encoder's 1x1 projection must produce), `code_depth` (D codes
  per grid position) and `vocab_sizes` (the vocabulary of each of the D levels).
Codes are (B, h, w) int64 for one level and (B, h, w, D) for D levels per position.

The quantization itself comes from `vector-quantize-pytorch` (lucidrains):
- `FSQ`: finite scalar quantization (Mentzer et al. 2023); no codebook, no auxiliary loss, cannot
  collapse by construction.
- `LFQ`: lookup-free quantization (MAGVIT-v2), with its per-sample minus batch entropy loss.
- `ResidualVQ`: residual VQ of depth D (RQ-VAE, SoundStream), EMA codebooks, optional shared
  codebook and quantizer dropout.
Written here: the wrapping (layout, fp32 under autocast, usage statistics), `build_quantizer`,
and `HierarchicalQuantizer`, VQ-VAE-2's two-level hierarchy, which the library does not provide:
top codes at half the bottom resolution, the bottom quantizer conditioned on the decoded top.
Its codes are flattened per top position as (top, 4 bottom codes in raster order), D = 5, so
every consumer of (B, h, w, D) codes takes it unchanged; `grid_factor` = 2 says the code grid is
half the encoder's. Quantization runs in fp32 even under autocast, as for plain VQ.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
from einops import rearrange

from stage1_tokenizer.quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer


def flat_codes(codes: torch.Tensor, vocab_sizes: list[int]) -> torch.Tensor:
    """Codes of every level in one index space of sum(vocab_sizes) entries: level i is shifted by
    the sizes before it (the last axis holds the levels); one-level codes are returned as they are."""
    if len(vocab_sizes) == 1:
        return codes
    return codes + torch.tensor([0, *vocab_sizes[:-1]], device=codes.device).cumsum(0)


def usage_stats(codes_flat: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """Fraction of the `num_codes` used by this batch, and the perplexity of their distribution."""
    counts = torch.bincount(codes_flat.flatten(), minlength=num_codes).float()
    probs = counts / counts.sum().clamp_min(1.0)
    return {"quantizer/batch_usage": (counts > 0).float().mean(),
            "quantizer/perplexity": torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())}


class _UsageWindow(nn.Module):
    """Which codes were used within the last `window` training steps (saved with the weights)."""

    def __init__(self, num_codes: int, window: int):
        super().__init__()
        self.window = window
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.long))

    @torch.no_grad()
    def update(self, codes_flat: torch.Tensor) -> None:
        self.step += 1
        self.last_used[codes_flat.flatten().unique()] = self.step

    def usage(self) -> torch.Tensor:
        recent = self.step - self.last_used < self.window
        return (recent & (self.last_used > 0)).float().mean()


def _flatten(z: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h*w, C) fp32, the layout the library quantizers take."""
    if z.dim() != 4 or z.shape[1] != channels:
        raise ValueError(f"quantizer expects latents (B, {channels}, h, w), got {tuple(z.shape)}")
    return rearrange(z.float(), "b c h w -> b (h w) c")


class _LibraryQuantizer(nn.Module):
    """Shared plumbing: layout, fp32 under autocast, usage window and statistics."""

    latent_dim: int
    code_depth: int = 1
    grid_factor: int = 1
    vocab_sizes: list[int]

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config

    def _quantize(self, z_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) fp32 -> (z_q (B, N, C), codes (B, N) or (B, N, D), loss ())."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        B, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_q, codes, loss = self._quantize(_flatten(z, self.latent_dim))
        flat = flat_codes(codes, self.vocab_sizes)
        if self.training:
            self.window.update(flat)
        stats = usage_stats(flat, sum(self.vocab_sizes))
        stats["quantizer/window_usage"] = self.window.usage()
        stats["quantizer/loss"] = loss.detach()
        return QuantizerOutput(z_q=rearrange(z_q, "b (h w) c -> b c h w", h=h, w=w),
                               codes=codes.reshape(B, h, w, *codes.shape[2:]).long(), loss=loss, stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        was_training = self.training
        self.eval()  # no state updates, no dropout of levels
        try:
            B, _, h, w = z.shape
            with torch.autocast(device_type=z.device.type, enabled=False):
                _, codes, _ = self._quantize(_flatten(z, self.latent_dim))
        finally:
            self.train(was_training)
        return codes.reshape(B, h, w, *codes.shape[2:]).long()

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        B, h, w = codes.shape[:3]
        with torch.autocast(device_type=codes.device.type, enabled=False):
            z_q = self._lookup(codes.reshape(B, h * w, *codes.shape[3:]))
        return rearrange(z_q.float(), "b (h w) c -> b c h w", h=h, w=w)

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FiniteScalarQuantizer(_LibraryQuantizer):
    """FSQ: each latent channel rounded to one of `levels[i]` values; prod(levels) codes, no loss."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        from vector_quantize_pytorch import FSQ
        self.levels = [int(v) for v in config.levels]
        self.fsq = FSQ(levels=self.levels)        # dim = len(levels): the tokenizer's 1x1 conv projects
        self.latent_dim, self.vocab_sizes = len(self.levels), [math.prod(self.levels)]
        self.window = _UsageWindow(self.vocab_sizes[0], config.usage_window)

    def _quantize(self, z_flat):
        z_q, codes = self.fsq(z_flat)
        return z_q, codes, z_flat.new_zeros(())

    def _lookup(self, codes):
        return self.fsq.indices_to_codes(codes)


class LookupFreeQuantizer(_LibraryQuantizer):
    """LFQ: the sign of each of log2(K) channels is one bit of the code; entropy loss for usage."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        from vector_quantize_pytorch import LFQ
        bits = int(math.log2(config.codebook_size))
        self.lfq = LFQ(dim=bits, codebook_size=config.codebook_size, entropy_loss_weight=config.lfq_entropy_weight,
                       commitment_loss_weight=config.beta, diversity_gamma=config.lfq_diversity_gamma)
        self.latent_dim, self.vocab_sizes = bits, [config.codebook_size]
        self.window = _UsageWindow(config.codebook_size, config.usage_window)

    def _quantize(self, z_flat):
        z_q, codes, loss = self.lfq(z_flat, inv_temperature=self.config.lfq_inv_temperature)
        return z_q, codes, loss

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample entropy, batch entropy) of LFQ's soft code assignment for latents (B, C, h, w)."""
        was_training = self.lfq.training
        self.lfq.train()  # the library computes the entropy terms in training mode only
        try:
            _, breakdown = self.lfq(_flatten(z, self.latent_dim), inv_temperature=self.config.lfq_inv_temperature,
                                    return_loss_breakdown=True)
        finally:
            self.lfq.train(was_training)
        return breakdown.per_sample_entropy, breakdown.batch_entropy

    def _lookup(self, codes):
        return self.lfq.indices_to_codes(codes)


class ResidualQuantizer(_LibraryQuantizer):
    """Residual VQ: D codebooks, each quantizing what the previous levels left; codes (B, h, w, D)."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        from vector_quantize_pytorch import ResidualVQ
        self.rvq = ResidualVQ(dim=config.code_dim, num_quantizers=config.depth, codebook_size=config.codebook_size,
                              shared_codebook=config.shared_codebook, quantize_dropout=config.quantize_dropout,
                              commitment_weight=config.beta, decay=config.ema_decay,
                              threshold_ema_dead_code=2 if config.dead_code_patience > 0 else 0)
        self.latent_dim, self.code_depth = config.code_dim, config.depth
        self.vocab_sizes = [config.codebook_size] * config.depth
        self.window = _UsageWindow(config.codebook_size * config.depth, config.usage_window)

    def _quantize(self, z_flat):
        z_q, codes, losses = self.rvq(z_flat)
        return z_q, codes, losses.sum()

    def _lookup(self, codes):
        return self.rvq.get_output_from_indices(codes)


class HierarchicalQuantizer(nn.Module):
    """VQ-VAE-2's two levels: a top VQ at half resolution, a bottom VQ conditioned on it.

    Latents z (B, C, h, w) with C = 4 * code_dim. top = VQ(conv_s2(z)); the decoded top is
    upsampled and concatenated with z to make the bottom latents; the decoder sees both levels,
    merged by a 1x1 conv. Codes (B, h/2, w/2, 5): the top code, then its 2x2 bottom codes.
    """

    code_depth, grid_factor = 5, 2

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        level = replace(config, type="vq")
        C, d = 4 * config.code_dim, config.code_dim
        self.latent_dim, self.vocab_sizes = C, [config.codebook_size] * 5
        self.to_top = nn.Sequential(nn.Conv2d(C, C, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(C, d, 1))
        self.top = VectorQuantizer(level)
        self.top_up = nn.ConvTranspose2d(d, C, 4, stride=2, padding=1)
        self.to_bottom = nn.Conv2d(2 * C, d, 1)
        self.bottom = VectorQuantizer(level)
        self.merge = nn.Conv2d(d + C, C, 1)

    @staticmethod
    def _check(z: torch.Tensor, channels: int) -> None:
        if z.dim() != 4 or z.shape[1] != channels or z.shape[2] % 2 or z.shape[3] % 2:
            raise ValueError(f"hierarchical quantizer expects latents (B, {channels}, h, w) with even h and w, "
                             f"got {tuple(z.shape)}")

    def _merge(self, bottom_q: torch.Tensor, top_up: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([bottom_q.to(top_up.dtype), top_up], dim=1))

    @staticmethod
    def pack(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """top (B, h/2, w/2), bottom (B, h, w) -> (B, h/2, w/2, 5)."""
        return torch.cat([top[..., None], rearrange(bottom, "b (h i) (w j) -> b h w (i j)", i=2, j=2)], dim=-1)

    @staticmethod
    def unpack(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return codes[..., 0], rearrange(codes[..., 1:], "b h w (i j) -> b (h i) (w j)", i=2, j=2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check(z, self.latent_dim)
        top = self.top(self.to_top(z))
        top_up = self.top_up(top.z_q.to(z.dtype))
        bottom = self.bottom(self.to_bottom(torch.cat([z, top_up], dim=1)))
        codes = self.pack(top.codes, bottom.codes)
        stats = usage_stats(flat_codes(codes, self.vocab_sizes), sum(self.vocab_sizes))
        for name, out in (("top", top), ("bottom", bottom)):
            stats[f"quantizer/{name}_usage"] = out.stats["quantizer/batch_usage"]
            stats[f"quantizer/{name}_window_usage"] = out.stats["quantizer/window_usage"]
        stats["quantizer/window_usage"] = (stats["quantizer/top_window_usage"]
                                           + stats["quantizer/bottom_window_usage"]) / 2
        return QuantizerOutput(z_q=self._merge(bottom.z_q, top_up), codes=codes, loss=top.loss + bottom.loss,
                               stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.latent_dim)
        top = self.top.encode(self.to_top(z))
        top_up = self.top_up(self.top.codes_to_latents(top).to(z.dtype))
        bottom = self.bottom.encode(self.to_bottom(torch.cat([z, top_up], dim=1)))
        return self.pack(top, bottom)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        top, bottom = self.unpack(codes)
        dtype = self.top_up.weight.dtype
        top_up = self.top_up(self.top.codes_to_latents(top).to(dtype))
        return self._merge(self.bottom.codes_to_latents(bottom), top_up)


QUANTIZERS = {"vq": VectorQuantizer, "fsq": FiniteScalarQuantizer, "lfq": LookupFreeQuantizer,
              "rvq": ResidualQuantizer, "vqvae2": HierarchicalQuantizer}


def build_quantizer(config: QuantizerConfig) -> nn.Module:
    """The quantizer `config.type` names (validated by QuantizerConfig)."""
    return QUANTIZERS[config.type](config)
