"""Batched sampling from a prior: `generate` takes either prior type.

Autoregressive (`GPTPrior`): LlamaGen's `generate` with a static key/value cache.
One token per step for the whole batch; the cache (`kv_cache.StaticKVDecoder`) makes a step cost
O(position) instead of recomputing the prefix (taming's default `sample` path). `use_cache=False`
recomputes the prefix every step with x-transformers' full forward and draws the same random
numbers, so it is a reference for tests, not for use.

Masked (`masked.MaskedPrior`): MaskGIT's iterative parallel decoding in `steps` forward passes
(`masked_sample.decode_masked`).
"""
from __future__ import annotations

import math
import sys
import weakref
from typing import Callable, Sequence

import torch

from stage2_prior import native_kernels
from stage2_prior.kv_cache import StaticKVDecoder
from stage2_prior.model import CodePrior, GPTPrior


def _check_options(prior: GPTPrior, cfg_scale: float, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if cfg_scale != 1.0 and prior.config.num_classes == 0:
        raise ValueError(f"classifier-free guidance needs a class-conditional prior; this one has num_classes=0, "
                         f"so use cfg_scale=1 (got {cfg_scale})")


def _keep_tensors(prior: GPTPrior, batch_size: int, keep_codes: torch.Tensor | None,
                  keep_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> keep (B, L) bool and forced token ids (B, L) (zeros where not kept)."""
    L, shape, device = prior.seq_len, prior.code_shape, prior.level_offsets.device
    if keep_codes is None and keep_mask is None:
        return (torch.zeros(batch_size, L, dtype=torch.bool, device=device),
                torch.zeros(batch_size, L, dtype=torch.long, device=device))
    if keep_codes is None or keep_mask is None:
        raise ValueError("keep_codes and keep_mask go together: the mask says which positions of keep_codes to keep")
    keep_mask = torch.as_tensor(keep_mask, device=device)
    if keep_mask.dtype != torch.bool:
        raise ValueError(f"keep_mask must be a bool tensor, got {keep_mask.dtype}")
    dims = tuple(keep_mask.shape)
    if dims in (shape, (L,)):
        keep = keep_mask.reshape(1, L).expand(batch_size, L)
    elif dims in ((batch_size, *shape), (batch_size, L)):
        keep = keep_mask.reshape(batch_size, L)
    else:
        raise ValueError(f"keep_mask must have shape ({L},), {shape}, ({batch_size}, {L}) or "
                         f"({batch_size}, {', '.join(map(str, shape))}), got {dims}")
    keep_codes = torch.as_tensor(keep_codes, device=device)
    if keep_codes.shape[0] == 1 and batch_size > 1:
        keep_codes = keep_codes.expand(batch_size, *keep_codes.shape[1:])
    if keep_codes.shape[0] != batch_size:
        raise ValueError(f"keep_codes has batch size {keep_codes.shape[0]}, expected {batch_size} (or 1)")
    codes = keep_codes.reshape(batch_size, -1) if tuple(keep_codes.shape[1:]) == shape else keep_codes
    if codes.dim() == 2 and codes.shape[1] == L:
        codes = torch.where(keep, codes.long(), 0)  # only kept positions must be valid codes
    forced = prior.flatten_codes(codes)             # shape and range checks; (B, L) token ids
    return keep, forced


# one generator for the batch, or one per row (see `_uniforms`)
Generators = torch.Generator | Sequence[torch.Generator] | None


def _uniforms(shape: torch.Size, generator: Generators, device: torch.device) -> torch.Tensor:
    """Uniforms (B, n) in float32 from one generator, or row b from generator[b]: then a row's numbers do
    not depend on the other rows, so what a sequence is batched with cannot change its sample (serving)."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.rand(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.stack(rows)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                   top_p: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (..., V) -> (logits / temperature over the candidates kept by top-k then top-p (-inf for
    the dropped), candidate vocabulary ids (..., k) or None when all of V stay). temperature > 0.

    With top-k the rest works on the k kept candidates only (the k largest, from `_top_k`), so the
    sort for top-p and the random draw cost O(k) instead of O(V)."""
    if temperature != 1:
        logits = logits / temperature
    candidates = None                                              # (..., k) vocabulary ids, or all of V
    if top_k is not None and top_k < logits.shape[-1]:
        logits, candidates = _top_k(logits, top_k)                 # sorted, largest first
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # drop a token once the mass before it already reaches top_p; the most likely token always stays
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return logits, candidates


def _top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k), through the native kernel for (B, V) fp32 CPU logits where it builds
    (about 4x faster at 16,384 codes; equal logits come in vocabulary order)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 \
            and native_kernels.available(torch.float32):
        return native_kernels.topk(logits, k)
    return torch.topk(logits, k, dim=-1)


def _sample_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                   generator: Generators) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): temperature, then top-k, then top-p (`_filter_logits`), then one
    Gumbel-max draw per row. `generator` may be a list of B generators, one per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, candidates = _filter_logits(logits, temperature, top_k, top_p)
    # Gumbel-max (argmax of logits + Gumbel noise) is an exact categorical sample that draws a
    # fixed-shape tensor per step, so the cached and uncached paths consume the generator alike
    uniform = _uniforms(logits.shape, generator, logits.device)
    gumbel = -torch.log(-torch.log(uniform.to(logits.device, torch.float64)))
    choice = (logits.to(torch.float64) + gumbel).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None])[:, 0]


# the decoders built per prior, one per (batch, dtype) shape, at most _MAX_DECODERS: their packed
# weights and caches serve later calls of the same shape (building one packs every weight, a
# noticeable cost per call for a large prior; a server alternates guided and unguided shapes)
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_DECODERS = 4


def _decoder_for(prior: GPTPrior, batch_size: int, weights_dtype: torch.dtype | None) -> StaticKVDecoder:
    # in-place updates (optimizer steps, load_state_dict) bump a tensor's version; replacing it changes
    # its storage: either way the copied weights are stale
    state = tuple((p._version, p.data_ptr()) for p in prior.parameters())
    shapes = _DECODERS.setdefault(prior, {})
    cached = shapes.get((batch_size, weights_dtype))
    if cached is not None and cached[0] == state:
        cached[1].reset()
        return cached[1]
    for key in [k for k, (s, _) in shapes.items() if s != state or k == (batch_size, weights_dtype)]:
        del shapes[key]            # free stale copies before making new ones
    while len(shapes) >= _MAX_DECODERS:
        del shapes[next(iter(shapes))]   # the oldest shape
    decoder = StaticKVDecoder(prior, batch_size, weights_dtype)
    shapes[(batch_size, weights_dtype)] = (state, decoder)
    return decoder


class _Progress:
    """A minimal progress line on stderr (tqdm when installed)."""

    def __init__(self, total: int, enabled: bool, unit: str = "tok"):
        self.bar, self.total, self.done, self.enabled, self.unit = None, total, 0, enabled, unit
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc="sampling", unit=unit)
            except ImportError:
                pass

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done == self.total or self.done % max(1, self.total // 10) == 0):
            print(f"sampling: {self.done}/{self.total} {self.unit}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def generate(prior: CodePrior, n: int | None = None, *, labels: torch.Tensor | None = None, cfg_scale: float = 1.0,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: Generators = None, seed: int | None = None,
             keep_codes: torch.Tensor | None = None, keep_mask: torch.Tensor | None = None,
             use_cache: bool = True, weights_dtype: torch.dtype | None = None,
             progress: bool = False, on_step: Callable[[int, torch.Tensor], None] | None = None,
             steps: int | None = None, choice_temperature: float | None = None) -> torch.Tensor:
    """Sample codes (B, *code_shape) from a prior of either type, B = n or len(labels).

    labels (B,) class ids (None = unconditional); cfg_scale != 1 applies classifier-free guidance,
    logits = uncond + s * (cond - uncond), with the conditional and null-class rows in one doubled
    batch (LlamaGen); without labels there is nothing to guide and cfg_scale has no effect.
    Completion / editing: where keep_mask ((L,), code_shape, (B, L) or (B, *code_shape), bool) is
    True the token is forced to keep_codes (B, *code_shape) instead of sampled. The prior is
    autoregressive, so a sampled position sees only the kept codes before it in raster order, never
    those after it; a masked prior sees every kept code. `seed` (or `generator`) makes the result reproducible; a list of B generators gives
    each row its own random numbers, so a row's sample does not depend on the other rows' generators.
    `weights_dtype` (e.g. torch.bfloat16, cached path only) samples with reduced-precision copies of the
    weights (a masked prior runs its passes under autocast to that dtype). `on_step(t, tokens)` is
    called once position t is final, with the token ids (B, L) so far (`prior.unflatten_tokens` turns
    them into codes; positions after t are not sampled yet); for a masked prior, after decoding step
    t, with `prior.mask_token` where a position is not decoded yet.
    Masked priors only: `steps` (T, default 8) forward passes, `choice_temperature` (default 4.5) the
    confidence noise at the first step, annealed linearly to 0; `use_cache` does not apply.
    """
    config = prior.config
    masked = prior.prior_type == "masked"
    if not masked and (steps is not None or choice_temperature is not None):
        raise ValueError("steps and choice_temperature apply to masked priors; this prior is autoregressive "
                         "(prior_type='ar'), which samples one token per step")
    if masked:
        from stage2_prior.masked_sample import decoding_options  # that module imports this one
        steps, choice_temperature = decoding_options(steps, choice_temperature)
    _check_options(prior, cfg_scale, temperature, top_k, top_p)
    if generator is not None and seed is not None:
        raise ValueError("pass generator or seed, not both")
    if weights_dtype is not None and not use_cache and not masked:
        raise ValueError("weights_dtype applies to the cached sampler; the uncached reference runs the model as is")
    device = prior.level_offsets.device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if labels is not None:
        labels = torch.as_tensor(labels, device=device)
        if labels.dim() != 1:
            raise ValueError(f"labels must be class ids of shape (B,), got shape {tuple(labels.shape)}")
        if n is not None and n != labels.shape[0]:
            raise ValueError(f"n={n} does not match the {labels.shape[0]} labels given")
        B = labels.shape[0]
    elif n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"give the number of samples n (a positive integer) or labels, got n={n!r}")
    else:
        B = n
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"got {len(generator)} generators for a batch of {B}: give one per row, or one generator")
    cond = prior.cond_tokens(labels, B)                        # (B,)
    guided = cfg_scale != 1.0 and labels is not None
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, config.null_token)])  # (2B,): cond rows, then null rows
    pair = 2 if guided else 1

    L = config.seq_len
    keep, forced = _keep_tensors(prior, B, keep_codes, keep_mask)           # (B, L), (B, L)
    free_steps = (~keep).any(dim=0).tolist()                                 # hoisted: any row sampled at t?
    if not any(free_steps):
        raise ValueError("keep_mask keeps every position: there is nothing to sample")
    if masked:
        from stage2_prior.masked_sample import decode_masked
        was_training = prior.training
        prior.eval()
        try:
            tokens = decode_masked(prior, cond, keep, forced, cfg_scale=cfg_scale, guided=guided, steps=steps,
                                   choice_temperature=choice_temperature, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=generator, weights_dtype=weights_dtype,
                                   progress=progress, on_step=on_step)
        finally:
            prior.train(was_training)
        return prior.unflatten_tokens(tokens)
    start = free_steps.index(True)                                           # leading positions all kept
    tokens = forced.clone()                                                  # (B, L), filled in place
    level_masked, editing = prior.has_level_mask, keep_mask is not None

    def next_logits(logits: torch.Tensor, t: int) -> torch.Tensor:
        """last-position logits (pair*B, V) -> guided, level-masked logits (B, V) for position t."""
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
        return prior.mask_logits(logits, t) if level_masked else logits

    was_training = prior.training
    prior.eval()
    bar = _Progress(L - start, progress)
    try:
        # prefill: the condition and every leading kept token in one pass
        inputs = torch.cat([cond[:, None], tokens[:, :start].repeat(pair, 1)], dim=1)  # (pair*B, start+1)
        decoder = _decoder_for(prior, pair * B, weights_dtype) if use_cache else None
        last = decoder.step(inputs) if use_cache else prior.forward_tokens(inputs)[:, -1]  # (pair*B, V)
        for t in range(start, L):
            if free_steps[t]:
                sampled = _sample_tokens(next_logits(last, t), temperature, top_k, top_p, generator)
                tokens[:, t] = torch.where(keep[:, t], forced[:, t], sampled) if editing else sampled
            if on_step is not None:
                on_step(t, tokens)
            bar.update()
            if t == L - 1:
                break
            if use_cache:
                last = decoder.step(tokens[:, t:t + 1].repeat(pair, 1))  # the new token only
            elif free_steps[t + 1]:
                inputs = torch.cat([cond[:, None], tokens[:, :t + 1].repeat(pair, 1)], dim=1)  # (pair*B, t+2)
                last = prior.forward_tokens(inputs)[:, -1]
    finally:
        bar.close()
        prior.train(was_training)
    return prior.unflatten_tokens(tokens)
