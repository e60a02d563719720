"""Reconstruction quality of a tokenizer: PSNR against a mean-colour baseline, codebook usage,
side-by-side grids. Used at the end of training and by `vqgan reconstruct`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from stage1_tokenizer.model import VQGAN
from stage1_tokenizer.quantizers import flat_codes


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale). (B,) tensor."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_metrics(model: VQGAN, batches: Iterable, device: str | torch.device = "cpu",
                           progress: bool = False,
                           on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Mean PSNR of reconstructions and of the per-image mean colour (the trivial baseline),
    L1, and how much of the codebook the images use (fraction and perplexity).
    `on_batch(images, reconstructions)` sees every batch, e.g. to save the images."""
    was_training = model.training
    model.eval()
    # every level's codes in one index space: (B, h, w, D) codes count in D separate vocabularies
    sizes = model.vocab_sizes
    K = sum(sizes)
    counts = torch.zeros(K, dtype=torch.long, device=device)
    psnr_sum = baseline_sum = l1_sum = 0.0
    n = 0
    for batch in tqdm(batches, desc="reconstruct", disable=not progress):
        images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
        codes = model.encode(images)
        recon = model.decode(codes)
        mean_colour = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        psnr_sum += psnr(recon, images).sum().item()
        baseline_sum += psnr(mean_colour, images).sum().item()
        l1_sum += (recon - images).abs().flatten(1).mean(1).sum().item()
        counts += torch.bincount(flat_codes(codes, sizes).flatten(), minlength=K)
        n += images.shape[0]
        if on_batch is not None:
            on_batch(images, recon)
    model.train(was_training)
    if n == 0:
        raise ValueError("reconstruction_metrics: no images were given")
    probs = counts.float() / counts.sum()
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()).item()
    return {
        "images": n,
        "psnr": psnr_sum / n,
        "mean_colour_psnr": baseline_sum / n,
        "l1": l1_sum / n,
        "codebook_usage": (counts > 0).float().mean().item(),
        "codes_used": int((counts > 0).sum().item()),
        "codebook_size": K,
        "perplexity": perplexity,
    }


def save_comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> None:
    """One PNG: originals on the top row, reconstructions below (images in [-1, 1])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    both = torch.cat([originals.cpu(), reconstructions.cpu()]).float().clamp(-1, 1)
    grid = make_grid((both + 1) / 2, nrow=originals.shape[0], padding=2, pad_value=1.0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)
