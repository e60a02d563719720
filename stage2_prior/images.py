"""From codes to pictures: sampling and completion decoded by a tokenizer.

The only place in stage 2 that touches pixels; it uses the tokenizer through its public API
(`from_pretrained`, `encode`, `decode`, `code_grid`, `content_hash`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from common import atomic_write_json
from stage1_tokenizer import VQGAN
from stage2_prior.load import load_prior
from stage2_prior.masked_sample import decoding_options
from stage2_prior.model import CodePrior
from stage2_prior.sample import generate


def load_pair(prior_dir: str | Path, tokenizer_dir: str | Path, device: str = "cpu") -> tuple[CodePrior, VQGAN]:
    """Load a tokenizer and the prior (either type) trained on its codes; a mismatched pair is a PriorLoadError."""
    tokenizer = VQGAN.from_pretrained(tokenizer_dir, device=device)
    prior = load_prior(prior_dir, tokenizer_hash=tokenizer.content_hash(), device=device)
    return prior.eval(), tokenizer


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()


def write_images(images: torch.Tensor, out_dir: Path, names: Sequence[str], grid_name: str = "grid.png",
                 nrow: int = 8) -> None:
    """images (N, 3, H, W) in [-1, 1] -> out_dir/NAME.png each, plus one grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        save_image(to_unit(image), out_dir / f"{name}.png")
    save_image(make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0), out_dir / grid_name)


def decoding_record(prior: CodePrior, steps: int | None, choice_temperature: float | None) -> dict:
    """The prior type, and for a masked prior its decoding options (defaults filled in), for JSON records."""
    if prior.prior_type != "masked":
        return {"prior_type": prior.prior_type}
    steps, choice_temperature = decoding_options(steps, choice_temperature)
    return {"prior_type": "masked", "steps": steps, "choice_temperature": choice_temperature}


def sample_images(prior: CodePrior, tokenizer: VQGAN, out_dir: str | Path, *, classes: Sequence[int] | None = None,
                  n: int = 16, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, batch_size: int = 64, progress: bool = True,
                  weights_dtype: torch.dtype | None = None, steps: int | None = None,
                  choice_temperature: float | None = None) -> dict:
    """Sample `n` images per class in `classes` (or `n` unconditional ones), in batches, decode and
    write OUT/NNNNNN.png, OUT/grid.png (one row per class) and OUT/samples.json. `weights_dtype`
    (torch.bfloat16) samples with bf16 copies of the prior's weights (see `generate`); `steps` and
    `choice_temperature` are a masked prior's decoding options."""
    out_dir = Path(out_dir)
    labels = None
    if classes:
        labels = torch.tensor([c for c in classes for _ in range(n)], dtype=torch.long)
    total = len(labels) if labels is not None else n
    device = next(prior.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for start in tqdm(range(0, total, batch_size), desc="sample", disable=not progress):
        count = min(batch_size, total - start)
        batch_labels = labels[start:start + count].to(device) if labels is not None else None
        codes = generate(prior, count if batch_labels is None else None, labels=batch_labels, cfg_scale=cfg_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                         weights_dtype=weights_dtype, steps=steps, choice_temperature=choice_temperature)
        images.append(tokenizer.decode(codes).cpu())
    images = torch.cat(images)
    write_images(images, out_dir, [f"{i:06d}" for i in range(total)], nrow=n if classes else 8)
    record = {"n": total, "classes": list(classes) if classes else None, "per_class": n if classes else None,
              "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
              "weights_dtype": str(weights_dtype or "model"), "tokenizer_hash": tokenizer.content_hash(),
              **decoding_record(prior, steps, choice_temperature)}
    atomic_write_json(out_dir / "samples.json", record)
    return record


def box_to_keep_mask(box: tuple[int, int, int, int], image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Pixel box x0,y0,x1,y1 (the region to regenerate) -> keep mask (h, w): False where a code's
    footprint overlaps the box at all (partially covered positions are regenerated)."""
    x0, y0, x1, y1 = box
    H, W = image_size
    h, w = grid
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(f"box {box} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} (pixels)")
    fy, fx = H // h, W // w
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[y0 // fy: -(-y1 // fy), x0 // fx: -(-x1 // fx)] = False
    return keep


def complete_images(prior: CodePrior, tokenizer: VQGAN, images: torch.Tensor, keep: torch.Tensor, out_dir: str | Path,
                    *, labels: torch.Tensor | None = None, samples: int = 4, cfg_scale: float = 1.0,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int = 0, weights_dtype: torch.dtype | None = None, steps: int | None = None,
                    choice_temperature: float | None = None) -> dict:
    """Encode `images` (B, 3, H, W), keep the codes where `keep` (h, w) is True, sample the rest
    `samples` times each (taming's completion), decode; writes one grid row per image:
    input, its reconstruction with the regenerated region greyed out, then the completions."""
    out_dir = Path(out_dir)
    device = next(prior.parameters()).device
    images = images.to(device)
    codes = tokenizer.encode(images)                                    # (B, h, w) or (B, h, w, D)
    if tuple(keep.shape) != tuple(codes.shape[1:3]):
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, the code grid is {tuple(codes.shape[1:3])}")
    if keep.all():
        raise ValueError("the keep mask keeps every position: nothing to complete")
    if not keep.any():
        raise ValueError("the keep mask keeps nothing: use `vqgan sample` to generate from scratch")
    B = codes.shape[0]
    keep_codes = codes.repeat_interleave(samples, 0)
    position_keep = keep
    if codes.dim() == 4:  # D codes per position: a position is kept or regenerated whole
        keep = keep[..., None].expand(*keep.shape, codes.shape[-1])
    keep_labels = labels.to(device).repeat_interleave(samples, 0) if labels is not None else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    completed = generate(prior, B * samples if keep_labels is None else None, labels=keep_labels, cfg_scale=cfg_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                         keep_codes=keep_codes, keep_mask=keep.to(device), weights_dtype=weights_dtype,
                         steps=steps, choice_temperature=choice_temperature)
    decoded = tokenizer.decode(completed).cpu()
    recon = tokenizer.decode(codes).cpu()
    f = tokenizer.code_factor
    pixel_keep = position_keep.repeat_interleave(f, 0).repeat_interleave(f, 1)
    masked = torch.where(pixel_keep, recon, torch.zeros_like(recon))
    rows = []
    for i in range(B):
        rows += [images[i].cpu(), masked[i], *decoded[i * samples:(i + 1) * samples]]
    write_images(torch.stack(rows), out_dir, [f"row{i // (samples + 2):03d}_{i % (samples + 2)}" for i in range(len(rows))],
                 nrow=samples + 2)
    record = {"images": B, "samples_per_image": samples, "kept_positions": int(position_keep.sum()),
              "regenerated_positions": int((~position_keep).sum()), "cfg_scale": cfg_scale, "seed": seed,
              "kept_codes_unchanged": bool((completed[:, keep] == keep_codes[:, keep]).all()),
              **decoding_record(prior, steps, choice_temperature)}
    atomic_write_json(out_dir / "completion.json", record)
    return record
