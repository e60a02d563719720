"""Iterative parallel decoding for the masked prior (MaskGIT): T forward passes for the whole grid.

Every step predicts all positions still masked in one bidirectional pass, draws a code for each
(temperature, top-k, top-p as in the autoregressive sampler, one inverse-CDF draw per position),
and commits the most confident ones,
leaving gamma((s+1)/T) of the free positions masked for the next step (`mask_fraction`; 0 after the
last step). Confidence is the log-probability of the drawn code plus Gumbel noise scaled by
`choice_temperature * (1 - (s+1)/T)`: random early, greedy late (MaskGIT's annealing). Committed and
kept codes are never changed. Reached through `stage2_prior.generate`, which checks the options.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch

from stage2_prior.masked import MaskedPrior, mask_fraction
from stage2_prior.sample import Generators, _filter_logits, _Progress, _uniforms

DEFAULT_STEPS = 8
DEFAULT_CHOICE_TEMPERATURE = 4.5   # MaskGIT's ImageNet setting


def decoding_options(steps: int | None, choice_temperature: float | None) -> tuple[int, float]:
    """(steps, choice_temperature) with the defaults filled in for None, checked."""
    steps = DEFAULT_STEPS if steps is None else steps
    choice_temperature = DEFAULT_CHOICE_TEMPERATURE if choice_temperature is None else choice_temperature
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (decoding passes), got {steps!r}")
    if isinstance(choice_temperature, bool) or not isinstance(choice_temperature, (int, float)) \
            or not math.isfinite(choice_temperature) or choice_temperature < 0:
        raise ValueError(f"choice_temperature must be a finite number >= 0, got {choice_temperature!r}")
    return steps, choice_temperature


def commit_counts(free: torch.Tensor, steps: int, schedule: str) -> list[torch.Tensor]:
    """free (B,) free positions per row -> for each step, how many stay masked after it (B,).

    Non-increasing, 0 after the last step, and at most `still masked - 1` so every step commits at
    least one code while any is left."""
    counts, remaining = [], free.clone()
    for s in range(steps):
        target = (mask_fraction((s + 1) / steps, schedule) * free.double()).floor().long()
        remaining = torch.minimum(target, (remaining - 1).clamp(min=0))
        counts.append(remaining)
    return counts


def _row_uniforms(rows: torch.Tensor, batch_size: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """One uniform per entry of `rows` (N,), grouped by row; with a list of B generators row b's come
    from generator b alone, so they do not depend on the other rows (serving)."""
    if isinstance(generator, (list, tuple)):
        counts = torch.bincount(rows, minlength=batch_size).tolist()
        parts = [torch.rand(n, generator=g, device=g.device) for n, g in zip(counts, generator)]
        return torch.cat(parts).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(rows.shape[0], generator=generator, device=gen_device).to(device)


def draw_codes(logits: torch.Tensor, rows: torch.Tensor, batch_size: int, temperature: float,
               top_k: int | None, top_p: float | None, generator: Generators) -> torch.Tensor:
    """One code per still-masked position: logits (N, V) of positions of batch rows `rows` (N,), grouped
    by row -> token ids (N,). Temperature / top-k / top-p as the autoregressive sampler, then an
    inverse-CDF draw: one random number per position instead of V (Gumbel-max), which made the
    draws cost as much as a tiny prior's forward pass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, candidates = _filter_logits(logits, temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = _row_uniforms(rows, batch_size, generator, logits.device) * cdf[:, -1]
    choice = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    # a draw at the very top of the rounded CDF can land on a dropped (zero-probability) tail entry
    dropped = probs.gather(-1, choice[:, None])[:, 0] == 0
    if dropped.any():
        choice = torch.where(dropped, probs.argmax(dim=-1), choice)
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


@torch.no_grad()
def decode_masked(prior: MaskedPrior, cond: torch.Tensor, keep: torch.Tensor, forced: torch.Tensor, *,
                  cfg_scale: float, guided: bool, steps: int, choice_temperature: float, temperature: float,
                  top_k: int | None, top_p: float | None, generator: Generators,
                  weights_dtype: torch.dtype | None = None, progress: bool = False,
                  on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """-> token ids (B, L). cond (pair*B,) condition tokens (conditional rows, then null rows when
    guided); keep (B, L) bool and forced (B, L) token ids: kept positions hold forced[b, p] throughout.
    Makes one forward pass per step, `steps` in all unless fewer positions than steps are free.
    `on_step(s, tokens)` after step s, with [MASK] (`prior.mask_token`) at positions not yet decoded.
    Only the positions still masked are drawn, guided and ranked: decided ones cost nothing after the pass."""
    B, L = keep.shape
    device = forced.device
    pair = 2 if guided else 1
    tokens = torch.where(keep, forced, prior.mask_token)
    unknown = ~keep
    stay_masked = commit_counts(unknown.sum(dim=1), steps, prior.config.mask_schedule)
    autocast = (torch.autocast(device.type, dtype=weights_dtype) if weights_dtype is not None
                else nullcontext())
    confidence = torch.empty(B, L, device=device)
    bar = _Progress(steps, progress, unit="step")
    try:
        for s in range(steps):
            if not unknown.any():
                break
            rows, cols = unknown.nonzero(as_tuple=True)                    # row-major: grouped by row
            with autocast:
                logits = prior.forward_tokens(tokens.repeat(pair, 1), cond)  # (pair*B, L, V)
            picked = logits[rows, cols].float()                              # (N, V): masked positions only
            if guided:
                unguided = logits[rows + B, cols].float()
                picked = unguided + cfg_scale * (picked - unguided)
            if prior.has_level_mask:
                picked = picked.masked_fill(~prior.level_allowed[prior.position_depth[cols]], float("-inf"))
            drawn = draw_codes(picked, rows, B, temperature, top_k, top_p, generator)           # (N,)
            confidence.fill_(float("inf"))                                 # decided positions rank last
            confidence[rows, cols] = picked.log_softmax(dim=-1).gather(-1, drawn[:, None])[:, 0]
            noise_scale = choice_temperature * (1.0 - (s + 1) / steps)
            if noise_scale > 0:
                uniform = _uniforms(torch.Size((B, L)), generator, device).to(device).clamp_min(1e-20)
                confidence += noise_scale * -torch.log(-torch.log(uniform))
            ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)
            still = ranks < stay_masked[s].to(device)[:, None]            # the least confident stay masked
            commit = ~still[rows, cols]                                    # (N,) of the masked positions
            tokens[rows[commit], cols[commit]] = drawn[commit]
            unknown = still
            if on_step is not None:
                on_step(s, tokens)
            bar.update()
    finally:
        bar.close()
    return tokens
