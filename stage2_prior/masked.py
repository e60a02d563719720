"""The masked-token prior (MaskGIT / MUSE, absorbing-state discrete diffusion) over the tokenizer's codes.

A bidirectional transformer (x-transformers `Encoder`) sees the condition token and the whole code
sequence, with some positions replaced by a [MASK] token, and predicts the codes at the masked
positions. The token layout is the autoregressive prior's (`model.CodePrior`): codes with level
offsets, class k = `vocab_size + k`, null = `vocab_size + num_classes`; [MASK] comes after null:

    input   [cond, t_0, [MASK], t_2, [MASK], ...]  ->  logits (B, L, V); loss on the masked positions

Training draws, per item, r ~ U(0, 1) and masks ceil(gamma(r) * L) positions chosen uniformly at
random (gamma = `mask_schedule`, cosine by default: MaskGIT's choice, which favours heavily masked
inputs, the hard part of decoding). Label dropout as in the autoregressive prior gives the null
condition that classifier-free guidance needs. Decoding (T parallel steps) is
`masked_sample.decode_masked`, reached through `stage2_prior.generate`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from stage2_prior.model import CodePrior, PriorConfig

with warnings.catch_warnings():  # x-transformers' attend.py uses the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from x_transformers import Encoder


def mask_fraction(progress: torch.Tensor | float, schedule: str = "cosine") -> torch.Tensor:
    """gamma(r): the fraction of positions still masked at progress r in [0, 1] (1 at r=0, 0 at r=1).

    Training draws r uniformly; decoding step s of T leaves gamma((s+1)/T) of the free positions masked."""
    r = torch.as_tensor(progress, dtype=torch.float64)
    if schedule == "cosine":
        return torch.cos(r * math.pi / 2).clamp(min=0.0)  # cos(pi/2) is 6e-17, not 0
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r * r
    raise ValueError(f"unknown mask schedule {schedule!r}; expected cosine, linear or square")


class MaskedPrior(CodePrior):
    """A MaskGIT-style prior: bidirectional attention, a [MASK] token, loss on masked positions only."""

    PRIOR_TYPE = "masked"

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        # codes, classes, null, [MASK]; the condition token, then the L codes
        self.transformer = self._transformer(Encoder, config.vocab_size + config.num_classes + 2,
                                             config.seq_len + 1)
        self._init_transformer()

    @property
    def mask_token(self) -> int:
        """The [MASK] token id, after the code, class and null tokens."""
        return self.config.null_token + 1

    def random_mask(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, L) bool: per row, ceil(gamma(r) * L) positions (at least one) with r ~ U(0, 1), chosen
        uniformly; draws from the global RNG (seeded per process by the training loop)."""
        L = self.config.seq_len
        device = device if device is not None else self.level_offsets.device
        fraction = mask_fraction(torch.rand(batch_size), self.config.mask_schedule)
        count = (fraction * L).ceil().long().clamp(1, L).to(device)             # (B,)
        ranks = torch.rand(batch_size, L, device=device).argsort(dim=1).argsort(dim=1)
        return ranks < count[:, None]

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, *code_shape) or (B, L), labels (B,) or None, mask (B, L) bool or None (= a random
        schedule mask) -> (logits (B, L, V), mean cross-entropy over the masked positions)."""
        tokens = self.flatten_codes(codes)                            # (B, L)
        B, L = tokens.shape
        cond = self.drop_labels(self.cond_tokens(labels, B), labels)  # (B,)
        if mask is None:
            mask = self.random_mask(B, tokens.device)
        elif mask.shape != (B, L) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({B}, {L}), got {mask.dtype} {tuple(mask.shape)}")
        elif not mask.any():
            raise ValueError("mask masks no position: there is nothing to predict")
        logits = self.mask_logits(self.forward_tokens(tokens.masked_fill(mask, self.mask_token), cond))
        loss = F.cross_entropy(logits[mask].float(), tokens[mask])
        return logits, loss

    def forward_tokens(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, L, V) for token ids (B, L), [MASK] where unknown, and condition tokens (B,).

        One full bidirectional pass; other levels' logits are not masked here (guidance mixes raw
        logits first, see `masked_sample.decode_masked`)."""
        return self.transformer(torch.cat([cond[:, None], tokens], dim=1))[:, 1:]
