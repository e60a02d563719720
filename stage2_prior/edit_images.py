"""Editing images: encode with the tokenizer, edit the codes (`stage2_prior.edit`), decode, write.

Every command writes its results as PNGs, a side-by-side `grid.png` (one row per input: the input,
the mask, then the results) and `edit.json` describing what was done. Masks are pixel masks
mapped to code positions: a position counts as masked when any pixel of its footprint is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from common import atomic_write_json
from stage1_tokenizer import VQGAN
from stage2_prior import edit
from stage2_prior.images import write_images
from stage2_prior.model import CodePrior


# ---- masks --------------------------------------------------------------------------------------
def box_pixel_mask(box: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Pixel box x0,y0,x1,y1 (x1, y1 exclusive) -> pixel mask (H, W), True inside."""
    if len(box) != 4:
        raise ValueError(f"box must be four pixel coordinates x0,y0,x1,y1, got {list(box)}")
    x0, y0, x1, y1 = (int(v) for v in box)
    H, W = size
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} (pixels)")
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def png_pixel_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white / non-zero = edit) of exactly `size` (H, W) pixels -> pixel mask (H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist")
    try:
        with Image.open(path) as img:
            gray = img.convert("L")
    except OSError as e:
        raise ValueError(f"mask {path} is not a readable image: {e}") from None
    if gray.size != (size[1], size[0]):
        raise ValueError(f"mask {path} is {gray.size[0]}x{gray.size[1]} pixels; it must match the image "
                         f"size {size[1]}x{size[0]} (width x height) after resizing to the tokenizer's resolution")
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(size) > 127


def grid_mask(pixel_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask (H, W) -> code-position mask (H/f, W/f): a position is masked if any of its pixels is."""
    H, W = pixel_mask.shape
    if H % factor or W % factor:
        raise ValueError(f"mask size {W}x{H} is not divisible by the tokenizer's factor {factor}")
    return F.max_pool2d(pixel_mask.float()[None, None], factor)[0, 0] > 0


def _mask_picture(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(h, w) position mask -> (3, H, W) in [-1, 1]: white where edited."""
    pixels = mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1).float()
    return (pixels * 2 - 1)[None].expand(3, -1, -1)


def kept_region_psnr(edited: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, factor: int,
                     margin: int = 1) -> float | None:
    """Mean PSNR (dB, images in [-1, 1] scaled to [0, 1]) of `edited` against `reference` over the
    pixels of positions more than `margin` positions away from every masked one: the kept region
    away from the seam, where the decoder's receptive field does not reach into the edit. None when
    no position is that far."""
    far = ~edit.seam_band(mask[None], margin)[0] & ~mask if margin > 0 else ~mask
    if not far.any():
        return None
    pixels = far.repeat_interleave(factor, 0).repeat_interleave(factor, 1).cpu()
    diff = ((edited.float().cpu() - reference.float().cpu()) / 2)[..., pixels]       # (B, 3, n)
    mse = diff.pow(2).mean(dim=(1, 2)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def _write(rows: list[list[torch.Tensor]], out_dir: Path, record: dict) -> dict:
    """rows of (3, H, W) images -> out/rowRRR_CC.png, out/grid.png, out/edit.json."""
    ncol = max(len(r) for r in rows)
    blank = -torch.ones_like(rows[0][0])   # pads ragged rows so the grid stays aligned
    flat = [img.cpu() for row in rows for img in row + [blank] * (ncol - len(row))]
    names = [f"row{r:03d}_{c:02d}" for r in range(len(rows)) for c in range(ncol)]
    write_images(torch.stack(flat), out_dir, names, nrow=ncol)
    atomic_write_json(out_dir / "edit.json", record)
    return record


def _device(prior: CodePrior) -> torch.device:
    return prior.level_offsets.device


def _sampling(options: dict) -> dict:
    record = {k: options[k] for k in ("cfg_scale", "temperature", "top_k", "top_p", "seed") if k in options}
    return {**record, **{k: options[k] for k in ("steps", "choice_temperature") if options.get(k) is not None}}


# ---- commands -----------------------------------------------------------------------------------
def inpaint_images(prior: CodePrior, tokenizer: VQGAN, images: torch.Tensor, mask: torch.Tensor, out_dir: str | Path,
                   *, samples: int = 4, labels: torch.Tensor | None = None, seam_rounds: int = 0,
                   **options) -> dict:
    """Resample the masked code positions ((h, w), True = regenerate) of each image `samples` times."""
    out_dir = Path(out_dir)
    codes = tokenizer.encode(images.to(_device(prior)))
    mask = edit.check_mask(mask, tuple(codes.shape[1:3]), 1)[0]
    B = codes.shape[0]
    many = codes.repeat_interleave(samples, 0)
    rep_labels = labels.to(many.device).repeat_interleave(samples, 0) if labels is not None else None
    result = edit.resample(prior, many, mask, labels=rep_labels, seam_rounds=seam_rounds, **options)
    decoded = tokenizer.decode(result).cpu()
    f = tokenizer.code_factor
    recon = tokenizer.decode(many).cpu()
    picture = _mask_picture(mask, f)
    rows = [[images[i].cpu(), picture, *decoded[i * samples:(i + 1) * samples]] for i in range(B)]
    # with seam rounds the band around the mask is resampled too: only what lies beyond it is kept
    kept = ~mask if not seam_rounds else ~(mask | edit.seam_band(mask[None])[0])
    record = {"command": "inpaint", "images": B, "samples_per_image": samples, "masked_positions": int(mask.sum()),
              "kept_positions": int(kept.sum()), "seam_rounds": seam_rounds,
              "kept_codes_unchanged": bool((result[:, kept] == many[:, kept]).all()),
              "kept_region_psnr_db": kept_region_psnr(decoded, recon, ~kept, f), **_sampling(options)}
    return _write(rows, out_dir, record)


def transfer_images(prior: CodePrior, tokenizer: VQGAN, images: torch.Tensor, target_class: int, out_dir: str | Path,
                    *, resample_fractions: Sequence[float] = (0.5,), mask: torch.Tensor | None = None,
                    order: str = "raster", samples: int = 1, **options) -> dict:
    """Class transfer: per image, one result per resample fraction (or for `mask`) x `samples`."""
    out_dir = Path(out_dir)
    codes = tokenizer.encode(images.to(_device(prior)))
    B, f = codes.shape[0], tokenizer.code_factor
    grid = tuple(codes.shape[1:3])
    masks = [edit.check_mask(mask, grid, 1)[0]] if mask is not None else \
        [edit.fraction_mask(grid, r, order, options.get("seed", 0)) for r in resample_fractions]
    many = codes.repeat_interleave(samples, 0)
    labels = torch.full((many.shape[0],), target_class, dtype=torch.long)
    recon = tokenizer.decode(many).cpu()
    rows = [[images[i].cpu()] for i in range(B)]
    unchanged, psnr = [], []
    for m in masks:
        result = edit.class_transfer(prior, many, labels, mask=m, **options)
        decoded = tokenizer.decode(result).cpu()
        unchanged.append(bool((result[:, ~m] == many[:, ~m]).all()))
        psnr.append(kept_region_psnr(decoded, recon, m, f))
        for i in range(B):
            rows[i] += [_mask_picture(m, f), *decoded[i * samples:(i + 1) * samples]]
    record = {"command": "transfer", "images": B, "target_class": target_class, "samples_per_image": samples,
              "resampled_fractions": [round(float(m.float().mean()), 4) for m in masks], "order": order,
              "kept_codes_unchanged": all(unchanged), "kept_region_psnr_db": psnr, **_sampling(options)}
    return _write(rows, out_dir, record)


def mix_images(prior: CodePrior, tokenizer: VQGAN, image_a: torch.Tensor, image_b: torch.Tensor, region: torch.Tensor,
               out_dir: str | Path, *, samples: int = 1, seam_rounds: int = 1, labels: torch.Tensor | None = None,
               **options) -> dict:
    """Region (h, w) of b's codes pasted into a's, the seam band resampled `seam_rounds` times."""
    out_dir = Path(out_dir)
    codes = tokenizer.encode(torch.stack([image_a, image_b]).to(_device(prior)))
    a, b = codes[:1].repeat_interleave(samples, 0), codes[1:].repeat_interleave(samples, 0)
    spliced = edit.mix(a[:1], b[:1], region)
    mixed = edit.mix(a, b, region, prior=prior, seam_rounds=seam_rounds,
                     labels=None if labels is None else labels.expand(samples), **options)
    f = tokenizer.code_factor
    harmonised = tokenizer.decode(mixed).cpu()
    # a's codes stay outside the region and, with seam rounds, outside the band around it
    changed = region | edit.seam_band(region[None])[0] if seam_rounds else region
    row = [image_a.cpu(), image_b.cpu(), _mask_picture(region, f), tokenizer.decode(spliced)[0].cpu(), *harmonised]
    record = {"command": "mix", "region_positions": int(region.sum()), "seam_rounds": seam_rounds,
              "samples": samples, "columns": ["a", "b", "region", "spliced", "harmonised..."],
              "kept_codes_unchanged": bool((mixed[:, ~changed] == a[:, ~changed]).all()),
              "kept_region_psnr_db": kept_region_psnr(harmonised, tokenizer.decode(a).cpu(), changed, f),
              **_sampling(options)}
    return _write([row], out_dir, record)


def interpolate_images(tokenizer: VQGAN, image_a: torch.Tensor, image_b: torch.Tensor, out_dir: str | Path, *,
                       steps: int = 8, order: str = "raster", seed: int = 0) -> dict:
    """Frames from a to b by swapping code positions (no prior)."""
    out_dir = Path(out_dir)
    device = next(tokenizer.parameters()).device
    codes = tokenizer.encode(torch.stack([image_a, image_b]).to(device))
    frames = edit.interpolate(codes[:1], codes[1:], steps, order=order, seed=seed)[:, 0]
    decoded = tokenizer.decode(frames).cpu()
    record = {"command": "interpolate", "steps": steps, "order": order, "seed": seed}
    return _write([[image_a.cpu(), *decoded, image_b.cpu()]], out_dir, record)


def extend_images(prior: CodePrior, tokenizer: VQGAN, size: tuple[int, int], out_dir: str | Path, *, n: int = 4,
                  labels: torch.Tensor | None = None, image: torch.Tensor | None = None, progress: bool = True,
                  **options) -> dict:
    """Images of `size` (H, W) pixels beyond the trained size by sliding-window sampling; with
    `image`, its codes fill the top-left of the grid and are kept (extending it right / down)."""
    out_dir = Path(out_dir)
    H, W = tokenizer.code_grid(size)
    init = keep = None
    if image is not None:
        codes = tokenizer.encode(image[None].to(_device(prior)))          # (1, h, w[, D])
        h, w = codes.shape[1:3]
        init = torch.zeros(n, H, W, *codes.shape[3:], dtype=torch.long, device=codes.device)
        init[:, :h, :w] = codes
        keep = torch.zeros(H, W, dtype=torch.bool)
        keep[:h, :w] = True
    options.pop("weights_dtype", None)  # extend runs uncached full forwards with the model's own weights
    codes = edit.extend(prior, (H, W), n=None if labels is not None else n, labels=labels, init_codes=init,
                        keep=keep, progress=progress, **options)
    decoded = tokenizer.decode(codes).cpu()
    rows = [[img] for img in decoded]
    record = {"command": "extend", "size": [size[0], size[1]], "code_grid": [H, W], "trained_grid":
              list(prior.code_shape[:2]), "n": int(codes.shape[0]), "from_image": image is not None,
              "kept_codes_unchanged": bool((codes[:, keep] == init[:, keep]).all()) if keep is not None else None,
              "labels": labels.tolist() if labels is not None else None, **_sampling(options)}
    return _write(rows, out_dir, record)
