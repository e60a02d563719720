"""Editing in code space: functions on code grids (no pixels) with a prior of either type.

    from stage2_prior.edit import resample, class_transfer, mix, interpolate, extend, fraction_mask
    inpainted = resample(prior, codes, mask, seam_rounds=1, seed=0)        # mask (h, w): True = resample
    moved = class_transfer(prior, codes, target_labels, resample_fraction=0.5, cfg_scale=3.0)
    mixed = mix(codes_a, codes_b, region, prior=prior, seam_rounds=1)     # region from b, seams resampled
    frames = interpolate(codes_a, codes_b, steps=8)                       # (steps, B, h, w[, D])
    wide = extend(prior, (8, 16), labels=labels)                          # 2x wider than the trained 8x8

Codes are (B, h, w) or (B, h, w, D) as the tokenizer gives them; masks are over grid positions
(h, w) or (B, h, w), so a position's D codes are kept or resampled together.

What an autoregressive prior can condition on: a resampled position sees the condition (class)
and every code before it in raster order, kept or already resampled, and nothing after it. The
kept codes below and to the right of a hole therefore do not steer what fills it, and the seam
where the hole ends (its bottom and right edges) can disagree with the kept content. Seam rounds
help: each extra round resamples a band of `seam_width` positions on both sides of the mask's
edge, now conditioned on the filled hole above it. They change kept codes inside the band, which
is the price of a smoother seam; `seam_rounds=0` keeps every code outside the mask exactly.
A masked (bidirectional) prior sees both sides: every kept code steers every resampled one, so
seam rounds are rarely needed, and `extend` fills each window in `steps` parallel passes. Every
function takes either prior type; `steps` and `choice_temperature` are the masked prior's decoding
options (an error with an autoregressive prior).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stage2_prior.model import CodePrior
from stage2_prior.sample import _check_options, _Progress, _sample_tokens, generate

ORDERS = ("raster", "random", "center")


def _grid(prior: CodePrior) -> tuple[int, int]:
    return prior.code_shape[0], prior.code_shape[1]


def check_codes(prior: CodePrior, codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
    """codes must be (B, *code_shape) integers for this prior."""
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be integer codes, got {codes.dtype}")
    if tuple(codes.shape[1:]) != tuple(prior.code_shape):
        raise ValueError(f"{name} have shape {tuple(codes.shape)}, but the prior models codes of shape "
                         f"(B, {', '.join(map(str, prior.code_shape))}): the tokenizer and the prior do not match")
    return codes.long().to(prior.level_offsets.device)


def check_mask(mask: torch.Tensor, grid: tuple[int, int], batch_size: int, name: str = "mask") -> torch.Tensor:
    """A bool mask over grid positions, (h, w) or (B, h, w) -> (B, h, w); rejects all-False and all-True."""
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = resample), got {mask.dtype}")
    if tuple(mask.shape) == grid:
        mask = mask.expand(batch_size, *grid)
    elif tuple(mask.shape) != (batch_size, *grid):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected the code grid {grid} "
                         f"or ({batch_size}, {grid[0]}, {grid[1]})")
    per_image = mask.flatten(1)
    if not per_image.any(dim=1).all():
        raise ValueError(f"{name} selects no code position (for at least one image): nothing to edit")
    if per_image.all(dim=1).any():
        raise ValueError(f"{name} selects every code position (for at least one image): nothing is kept; "
                         f"sample from scratch instead")
    return mask


def _over_depth(mask: torch.Tensor, prior: CodePrior) -> torch.Tensor:
    """(B, h, w) position mask -> (B, *code_shape) token mask."""
    return mask[..., None].expand(*mask.shape, prior.code_shape[2]) if len(prior.code_shape) == 3 else mask


def seam_band(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Positions within `width` (Chebyshev distance) of the edge between True and False, on both sides."""
    if width < 1:
        raise ValueError(f"seam_width must be >= 1, got {width}")
    m = mask.float()[:, None]
    grow = lambda x: F.max_pool2d(x, 2 * width + 1, stride=1, padding=width)  # noqa: E731
    return (grow(m) > 0)[:, 0] & (grow(1 - m) > 0)[:, 0]


def position_order(grid: tuple[int, int], order: str = "raster", seed: int = 0) -> torch.Tensor:
    """Flat grid positions in the order named: raster, seeded random, or nearest the centre first."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = math.prod(grid)
    if order == "raster":
        return torch.arange(n)
    if order == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    distance = (ys - (grid[0] - 1) / 2) ** 2 + (xs - (grid[1] - 1) / 2) ** 2
    return torch.argsort(distance.flatten(), stable=True)


def fraction_mask(grid: tuple[int, int], resample_fraction: float, order: str = "raster",
                  seed: int = 0) -> torch.Tensor:
    """Mask (h, w) selecting round(fraction * h * w) positions (at least one, not all): the LAST ones
    in raster order (so the prior reads the kept top first), a seeded random subset, or the ones
    nearest the centre (keeping the surroundings of a centred object: its background)."""
    if not 0.0 < resample_fraction < 1.0:
        raise ValueError(f"resample_fraction must lie in (0, 1), got {resample_fraction}")
    positions = position_order(grid, order, seed)
    n = len(positions)
    count = min(n - 1, max(1, round(resample_fraction * n)))
    chosen = positions[n - count:] if order == "raster" else positions[:count]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(grid)


@torch.no_grad()
def resample(prior: CodePrior, codes: torch.Tensor, mask: torch.Tensor, *, labels: torch.Tensor | None = None,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, generator: torch.Generator | None = None, seam_rounds: int = 0,
             seam_width: int = 1, weights_dtype: torch.dtype | None = None, steps: int | None = None,
             choice_temperature: float | None = None) -> torch.Tensor:
    """Resample the positions where `mask` ((h, w) or (B, h, w), True = resample) is set, in raster
    order with every other code fixed; then `seam_rounds` rounds that resample the band of
    `seam_width` positions around the mask's edge (see the module docstring). -> codes like `codes`."""
    codes = check_codes(prior, codes)
    mask = check_mask(mask, _grid(prior), codes.shape[0]).to(codes.device)
    if seam_rounds < 0:
        raise ValueError(f"seam_rounds must be >= 0, got {seam_rounds}")
    if generator is None:
        generator = torch.Generator(device=codes.device).manual_seed(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("pass generator or seed, not both")
    options = dict(labels=labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=generator, weights_dtype=weights_dtype, steps=steps,
                   choice_temperature=choice_temperature)
    n = None if labels is not None else codes.shape[0]
    out = generate(prior, n, keep_codes=codes, keep_mask=~_over_depth(mask, prior), **options)
    band = seam_band(mask, seam_width)
    for _ in range(seam_rounds):
        out = generate(prior, n, keep_codes=out, keep_mask=~_over_depth(band, prior), **options)
    return out


def class_transfer(prior: CodePrior, codes: torch.Tensor, target_labels: torch.Tensor, *,
                   resample_fraction: float = 0.5, mask: torch.Tensor | None = None, order: str = "raster",
                   cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int = 0, seam_rounds: int = 0,
                   weights_dtype: torch.dtype | None = None, steps: int | None = None,
                   choice_temperature: float | None = None) -> torch.Tensor:
    """Keep part of each image's codes and resample the rest under `target_labels` with guidance.

    The resampled part is `mask` when given, else `fraction_mask(resample_fraction, order, seed)`:
    "raster" keeps the top rows, which the prior reads before the rest; "random" keeps a scattered
    subset. Needs a class-conditional prior."""
    if prior.config.num_classes == 0:
        raise ValueError("class transfer needs a class-conditional prior; this one has num_classes=0")
    codes = check_codes(prior, codes)
    if mask is None:
        mask = fraction_mask(_grid(prior), resample_fraction, order, seed)
    labels = torch.as_tensor(target_labels, device=codes.device)
    if labels.dim() == 0:
        labels = labels.expand(codes.shape[0])
    return resample(prior, codes, mask, labels=labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, seam_rounds=seam_rounds, weights_dtype=weights_dtype, steps=steps,
                    choice_temperature=choice_temperature)


def mix(codes_a: torch.Tensor, codes_b: torch.Tensor, region: torch.Tensor, *, prior: CodePrior | None = None,
        seam_rounds: int = 1, seam_width: int = 1, labels: torch.Tensor | None = None, cfg_scale: float = 1.0,
        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
        weights_dtype: torch.dtype | None = None, steps: int | None = None,
        choice_temperature: float | None = None) -> torch.Tensor:
    """Codes of a with `region` ((h, w) or (B, h, w), True = from b) taken from b; with a prior and
    seam_rounds > 0, the band around the region's edge is resampled to harmonise the seam."""
    codes_a, codes_b = torch.as_tensor(codes_a), torch.as_tensor(codes_b)
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"codes to mix must have one shape, got {tuple(codes_a.shape)} and {tuple(codes_b.shape)}")
    region = check_mask(region, tuple(codes_a.shape[1:3]), codes_a.shape[0], name="region").to(codes_a.device)
    take_b = region[..., None] if codes_a.dim() == 4 else region
    mixed = torch.where(take_b, codes_b, codes_a)
    if prior is None or seam_rounds == 0:
        return mixed
    band = seam_band(region, seam_width)
    generator = torch.Generator(device=prior.level_offsets.device).manual_seed(seed)
    n = None if labels is not None else mixed.shape[0]
    mixed = check_codes(prior, mixed)
    for _ in range(seam_rounds):
        mixed = generate(prior, n, labels=labels, keep_codes=mixed, keep_mask=~_over_depth(band, prior),
                         cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, weights_dtype=weights_dtype, steps=steps,
                         choice_temperature=choice_temperature)
    return mixed


def interpolate(codes_a: torch.Tensor, codes_b: torch.Tensor, steps: int = 8, *, order: str = "raster",
                seed: int = 0) -> torch.Tensor:
    """Frames (steps, B, h, w[, D]) going from a to b by swapping positions to b's codes in
    `position_order`; frame 0 is a and frame steps-1 is b. Pure code swapping: no prior."""
    codes_a, codes_b = torch.as_tensor(codes_a), torch.as_tensor(codes_b)
    if codes_a.shape != codes_b.shape:
        raise ValueError(f"codes to interpolate must have one shape, got {tuple(codes_a.shape)} and "
                         f"{tuple(codes_b.shape)}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    h, w = codes_a.shape[1:3]
    n = h * w
    ranks = position_order((h, w), order, seed)
    rank_grid = torch.empty(n, dtype=torch.long)
    rank_grid[ranks] = torch.arange(n)
    rank_grid = rank_grid.reshape(h, w).to(codes_a.device)
    frames = []
    for i in range(steps):
        swapped = rank_grid < round(i * n / (steps - 1))   # (h, w): the first k positions come from b
        take_b = swapped[..., None] if codes_a.dim() == 4 else swapped
        frames.append(torch.where(take_b, codes_b, codes_a))
    return torch.stack(frames)


def window_origin(index: int, size: int, window: int) -> int:
    """taming's sliding window: centre the window on `index` where it fits, else clamp it to the edge."""
    return min(max(index - window // 2, 0), size - window)


@torch.no_grad()
def extend(prior: CodePrior, grid: tuple[int, int], *, n: int | None = None, labels: torch.Tensor | None = None,
           init_codes: torch.Tensor | None = None, keep: torch.Tensor | None = None, cfg_scale: float = 1.0,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           progress: bool = False, steps: int | None = None, choice_temperature: float | None = None) -> torch.Tensor:
    """Sample codes on a grid (H, W) at least as large as the trained (h, w) by a sliding window
    (taming's scheme): each position is sampled from a window of the trained size placed so the
    position is as central as fits, conditioned on the window's codes before it in raster order
    (all already final, since the big grid is filled in raster order too). `init_codes`
    (B, H, W[, D]) with `keep` ((H, W) or (B, H, W), True = keep) extends existing content, e.g. an
    image's codes in the left columns. Each sampled position costs one full forward over at most
    h*w*D tokens (no cache: the window moves). A masked prior instead fills whole windows, each in
    `steps` parallel passes conditioned on every decided code inside it (`_extend_masked`).
    -> codes (B, H, W[, D])."""
    _check_options(prior, cfg_scale, temperature, top_k, top_p)
    if prior.prior_type != "masked" and (steps is not None or choice_temperature is not None):
        raise ValueError("steps and choice_temperature apply to masked priors; this prior is autoregressive")
    h, w = _grid(prior)
    H, W = (int(v) for v in grid)
    if H < h or W < w:
        raise ValueError(f"grid {H}x{W} must be at least the prior's trained grid {h}x{w}")
    D = prior.config.code_depth
    device = prior.level_offsets.device
    if labels is not None:
        labels = torch.as_tensor(labels, device=device)
        B = labels.shape[0] if labels.dim() == 1 else -1
    else:
        B = n if n is not None else (init_codes.shape[0] if init_codes is not None else -1)
    if not isinstance(B, int) or B < 1:
        raise ValueError("give n (a positive integer), labels (B,) or init_codes to set the batch size")
    cond = prior.cond_tokens(labels, B)
    guided = cfg_scale != 1.0 and labels is not None
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, prior.config.null_token)])
    pair = 2 if guided else 1

    offsets = prior.level_offsets                                                # (D,) per depth
    tokens = torch.zeros(B, H, W, D, dtype=torch.long, device=device)            # with level offsets
    keep_grid = torch.zeros(B, H, W, dtype=torch.bool, device=device)
    if init_codes is not None:
        init = torch.as_tensor(init_codes, device=device).long()
        expected = (B, H, W) if D == 1 else (B, H, W, D)
        if tuple(init.shape) != expected:
            raise ValueError(f"init_codes have shape {tuple(init.shape)}, expected {expected}")
        if keep is None:
            raise ValueError("init_codes need `keep`: which positions to keep")
        keep_grid = torch.as_tensor(keep, device=device).bool().expand(B, H, W)
        if keep_grid.all():
            raise ValueError("keep keeps every position of the grid: nothing to extend")
        init = init if D > 1 else init[..., None]
        sizes = torch.tensor(prior.config.level_sizes, device=device)
        if ((init < 0) | (init >= sizes)).any():
            raise ValueError(f"init_codes out of range for vocab sizes {list(prior.config.level_sizes)}")
        tokens = torch.where(keep_grid[..., None], init + offsets, tokens)

    generator = torch.Generator(device=device).manual_seed(seed)
    if prior.prior_type == "masked":
        return _extend_masked(prior, tokens - offsets, keep_grid, labels=labels, n=B, cfg_scale=cfg_scale,
                              temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, steps=steps,
                              choice_temperature=choice_temperature, progress=progress)
    was_training = prior.training
    prior.eval()
    bar = _Progress(H * W * D, progress)
    try:
        for i in range(H):
            oi = window_origin(i, H, h)
            for j in range(W):
                oj = window_origin(j, W, w)
                window = tokens[:, oi:oi + h, oj:oj + w].reshape(B, h * w * D)
                for d in range(D):
                    bar.update()
                    if keep_grid[:, i, j].all():
                        continue
                    t = ((i - oi) * w + (j - oj)) * D + d                     # local sequence position
                    inputs = torch.cat([cond[:, None], window[:, :t].repeat(pair, 1)], dim=1)
                    logits = prior.forward_tokens(inputs)[:, -1]
                    if guided:
                        c, u = logits.chunk(2)
                        logits = u + cfg_scale * (c - u)
                    logits = prior.mask_logits(logits, t)
                    sampled = _sample_tokens(logits, temperature, top_k, top_p, generator)
                    sampled = torch.where(keep_grid[:, i, j], tokens[:, i, j, d], sampled)
                    tokens[:, i, j, d] = sampled
                    window[:, t] = sampled
    finally:
        bar.close()
        prior.train(was_training)
    codes = tokens - offsets
    return codes if D > 1 else codes[..., 0]


def _window_starts(size: int, window: int) -> list[int]:
    """Window origins covering [0, size) with half-window overlap; the last one flush with the edge."""
    starts = list(range(0, size - window + 1, max(1, window // 2)))
    return starts if starts[-1] == size - window else starts + [size - window]


def _extend_masked(prior: CodePrior, codes: torch.Tensor, known: torch.Tensor, *, labels: torch.Tensor | None,
                   n: int, generator: torch.Generator, progress: bool, **options) -> torch.Tensor:
    """extend() for a masked prior: windows of the trained size, half-overlapping, in raster order;
    each samples its undecided positions in one `generate` call that keeps every decided code in it.
    codes (B, H, W, D) without offsets, known (B, H, W) -> codes (B, H, W[, D])."""
    h, w = _grid(prior)
    H, W = known.shape[1:]
    depth = len(prior.code_shape) == 3
    known = known.clone()
    origins = [(oi, oj) for oi in _window_starts(H, h) for oj in _window_starts(W, w)]
    bar = _Progress(len(origins), progress, unit="window")
    try:
        for oi, oj in origins:
            window_known = known[:, oi:oi + h, oj:oj + w]
            if not window_known.all():
                window = codes[:, oi:oi + h, oj:oj + w]
                filled = generate(prior, None if labels is not None else n, labels=labels,
                                  keep_codes=window if depth else window[..., 0],
                                  keep_mask=_over_depth(window_known, prior), generator=generator, **options)
                codes[:, oi:oi + h, oj:oj + w] = filled if depth else filled[..., None]
                known[:, oi:oi + h, oj:oj + w] = True
            bar.update()
    finally:
        bar.close()
    return codes if depth else codes[..., 0]
