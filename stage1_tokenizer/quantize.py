"""Vector quantizer with straight-through gradients and the known fixes for codebook collapse.

Written by hand rather than wrapping `vector_quantize_pytorch.VectorQuantize` because the
tokenizer must reproduce taming's and LlamaGen's quantizers exactly (taming's "legacy" beta
placement, LlamaGen's l2-normalised 8-d codes; checkpoint import is a later issue), keep the
distance computation in fp32 under autocast, and keep codebook updates identical on every
process under DDP. The other quantizer families (FSQ, LFQ, residual) come from that library.

Fixes for collapse (FIELD.md), each an option of `QuantizerConfig`:
- `l2_normalize`: cosine-similarity codes (ViT-VQGAN, LlamaGen).
- a low `code_dim`: the tokenizer projects z to it with 1x1 convs (factorised codes).
- `use_ema`: codebook updated as an EMA of assigned encoder outputs (VQ-VAE-2).
- `dead_code_patience`: a code unused for that many training steps is re-initialised from a
  recent encoder output.
- `entropy_weight`: per-sample entropy minus batch entropy of soft assignments (MaskGIT/LlamaGen).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class QuantizerConfig:
    type: str = "vq"                  # "vq" | "rvq" | "fsq" | "lfq" | "vqvae2" (stage1_tokenizer/quantizers.py)
    codebook_size: int = 1024         # vq, rvq (per level); lfq: a power of two, log2 of it = latent channels
    code_dim: int = 8                 # vq, rvq. LlamaGen: 8-d codes reach ~97 % usage at 16,384 entries
    l2_normalize: bool = True
    beta: float = 0.25                # commitment weight
    legacy_beta: bool = False         # taming's default: beta on the codebook term instead (see FIELD.md)
    use_ema: bool = False
    ema_decay: float = 0.99
    dead_code_patience: int = 0       # steps without use before a code is re-initialised; 0 = off
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    usage_window: int = 100           # training steps over which `window_usage` counts used codes
    levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: values per latent channel; prod = codes (1,000 here)
    depth: int = 4                    # rvq: codes per position
    shared_codebook: bool = False     # rvq: one codebook for every level
    quantize_dropout: bool = False    # rvq: train on a random depth so any depth <= D decodes
    lfq_entropy_weight: float = 0.1   # lfq: weight of per-sample minus batch entropy (MAGVIT-v2)
    lfq_diversity_gamma: float = 1.0  # lfq: weight of the batch entropy inside that term
    lfq_inv_temperature: float = 100.0  # lfq: sharpness of the soft assignment the entropy is taken over

    def __post_init__(self) -> None:
        types = ("vq", "rvq", "fsq", "lfq", "vqvae2")
        if self.type not in types:
            raise ValueError(f"quantizer.type={self.type!r}: expected one of {', '.join(types)}")
        if self.codebook_size < 2:
            raise ValueError(f"quantizer.codebook_size must be >= 2, got {self.codebook_size}")
        if self.type == "lfq" and self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"quantizer.codebook_size must be a power of two for lfq, got {self.codebook_size}")
        self.levels = tuple(self.levels)
        if not self.levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in self.levels):
            raise ValueError(f"quantizer.levels must be integers >= 2 (e.g. [8, 5, 5, 5]), got {list(self.levels)}")
        if self.depth < 1:
            raise ValueError(f"quantizer.depth must be >= 1, got {self.depth}")
        if self.code_dim < 1:
            raise ValueError(f"quantizer.code_dim must be >= 1, got {self.code_dim}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"quantizer.ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor                 # (B, code_dim, h, w), straight-through in training
    codes: torch.Tensor               # (B, h, w) int64
    loss: torch.Tensor                # the quantizer's total auxiliary loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _pick_global_rows(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` rows drawn uniformly from the concatenation of every process's `rows` (N_p, D) in rank
    order; the same (n, D) on every process. Moves only the picked rows: each process fills the
    ones it holds and one all-reduce sums them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        picks = torch.randint(0, rows.shape[0], (n,), generator=generator).to(rows.device)
        return rows[picks]
    sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(rows.shape[0], device=rows.device))
    offsets = torch.tensor([0, *[int(s) for s in sizes]]).cumsum(0)
    picks = torch.randint(0, int(offsets[-1]), (n,), generator=generator)
    start, end = int(offsets[dist.get_rank()]), int(offsets[dist.get_rank() + 1])
    mine = (picks >= start) & (picks < end)
    picked = torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device)
    picked[mine.to(rows.device)] = rows[(picks[mine] - start).to(rows.device)]
    dist.all_reduce(picked)  # each row is non-zero on exactly one process: the sum is that row, exactly
    return picked


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer over a learned codebook.

    forward(z (B, D, h, w)) -> QuantizerOutput; `codes_to_latents(codes (B, h, w))` is its inverse.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        K, D = config.codebook_size, config.code_dim
        self.embedding = nn.Embedding(K, D)
        # taming's init; with l2 normalisation only directions matter
        nn.init.uniform_(self.embedding.weight, -1.0 / K, 1.0 / K)
        if config.use_ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(K))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # training-step counter and the step each code was last used: drive the usage window and
        # dead-code revival, and are saved so a resumed run continues identically
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(K, dtype=torch.long))

    @property
    def latent_dim(self) -> int:
        """Channels of the latents this quantizer takes."""
        return self.config.code_dim

    @property
    def code_depth(self) -> int:
        return 1

    grid_factor = 1  # the code grid is the encoder's grid

    @property
    def vocab_sizes(self) -> list[int]:
        return [self.config.codebook_size]

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) code vectors as used for lookup (normalised when l2_normalize)."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.config.l2_normalize else weight

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, D, h, w) quantized latents."""
        z_q = F.embedding(codes, self.codebook)
        return rearrange(z_q, "b h w d -> b d h w")

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h, w) int64 codes; no losses, no state updates."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.config.l2_normalize:
                z = F.normalize(z, dim=1)
            codes = self.distances(rearrange(z, "b d h w -> (b h w) d")).argmin(dim=1)
        return rearrange(codes, "(b h w) -> b h w", b=z.shape[0], h=z.shape[2], w=z.shape[3])

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (N, K) from fp32 vectors (N, D) to the codebook."""
        codebook = self.codebook
        return (z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                - 2.0 * z_flat @ codebook.t())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        cfg = self.config
        B, D, h, w = z.shape
        if D != cfg.code_dim:
            raise ValueError(f"quantizer expects {cfg.code_dim} channels, got {D}")
        # distances and losses in fp32 even under autocast: bf16 argmin flips near-ties
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if cfg.l2_normalize:
                z = F.normalize(z, dim=1)
            z_flat = rearrange(z, "b d h w -> (b h w) d")
            dist_ = self.distances(z_flat)                         # (N, K)
            codes_flat = dist_.argmin(dim=1)                       # (N,)
            z_q_flat = F.embedding(codes_flat, self.codebook)      # (N, D)

            commitment_loss = F.mse_loss(z_flat, z_q_flat.detach())
            if cfg.use_ema:
                codebook_loss = torch.zeros((), device=z.device)
            else:
                codebook_loss = F.mse_loss(z_q_flat, z_flat.detach())
            if cfg.legacy_beta:
                loss = cfg.beta * codebook_loss + commitment_loss
            else:
                loss = codebook_loss + cfg.beta * commitment_loss

            stats = {}
            if cfg.entropy_weight > 0:
                entropy_loss = self._entropy_loss(dist_)
                loss = loss + cfg.entropy_weight * entropy_loss
                stats["quantizer/entropy_loss"] = entropy_loss.detach()

            counts = torch.bincount(codes_flat, minlength=cfg.codebook_size).float()
            if self.training:  # usage statistics of the global batch from here on
                counts = self._training_updates(z_flat.detach(), codes_flat, counts)

            # straight-through estimator: forward uses z_q, backward copies gradients to z
            z_q_flat = z_flat + (z_q_flat - z_flat).detach()

        probs = counts / counts.sum()
        stats["quantizer/commitment_loss"] = commitment_loss.detach()
        stats["quantizer/codebook_loss"] = codebook_loss.detach()
        stats["quantizer/batch_usage"] = (counts > 0).float().mean()
        stats["quantizer/perplexity"] = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        stats["quantizer/window_usage"] = self.window_usage()
        z_q = rearrange(z_q_flat, "(b h w) d -> b d h w", b=B, h=h, w=w)
        codes = rearrange(codes_flat, "(b h w) -> b h w", b=B, h=h, w=w)
        return QuantizerOutput(z_q=z_q, codes=codes, loss=loss, stats=stats)

    def _entropy_loss(self, distances: torch.Tensor) -> torch.Tensor:
        """Per-sample entropy (want low: confident) minus entropy of the mean (want high: diverse)."""
        log_probs = F.log_softmax(-distances / self.config.entropy_temperature, dim=-1)
        probs = log_probs.exp()
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        avg_probs = probs.mean(0)
        avg_entropy = -(avg_probs * torch.log(avg_probs.clamp_min(1e-10))).sum()
        return sample_entropy - avg_entropy

    def window_usage(self) -> torch.Tensor:
        """Fraction of codes used within the last `usage_window` training steps."""
        recent = self.step - self.last_used < self.config.usage_window
        return (recent & (self.last_used > 0)).float().mean()

    @torch.no_grad()
    def _training_updates(self, z_flat: torch.Tensor, codes_flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Usage window, EMA codebook and dead-code revival; returns the code counts summed over processes."""
        cfg = self.config
        counts = _all_reduce_sum(counts.clone())  # every process sees the global usage
        self.step += 1
        self.last_used[counts > 0] = self.step
        if cfg.use_ema:
            embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes_flat, z_flat)
            embed_sum = _all_reduce_sum(embed_sum)
            self.ema_cluster_size.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
            self.ema_embed_sum.mul_(cfg.ema_decay).add_(embed_sum, alpha=1 - cfg.ema_decay)
            # Laplace smoothing keeps never-used codes from dividing by zero
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + 1e-5) / (n + cfg.codebook_size * 1e-5) * n
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        if cfg.dead_code_patience > 0:
            self._revive_dead_codes(z_flat)
        return counts

    def _revive_dead_codes(self, z_flat: torch.Tensor) -> None:
        # a code never used yet counts as unused since step 0
        dead = (self.step - self.last_used) >= self.config.dead_code_patience
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # seeded by the step so a resumed run makes the same choice; the picks index the global
        # batch (the processes' rows in rank order), so N processes pick what one process would
        gen = torch.Generator(device="cpu").manual_seed(int(self.step))
        replacements = _pick_global_rows(z_flat, n_dead, gen)
        self.embedding.weight.data[dead] = replacements.to(self.embedding.weight.dtype)
        if self.config.use_ema:
            self.ema_embed_sum[dead] = replacements
            self.ema_cluster_size[dead] = 1.0
        self.last_used[dead] = self.step
