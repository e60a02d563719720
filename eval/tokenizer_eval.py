"""Tokenizer metrics on a held-out split: PSNR, SSIM, LPIPS, codebook usage and perplexity, and
the reconstructions written as PNGs so rFID can compare them with the originals.

Uses stage 1 only through its public API (`encode`, `decode`) and the shared
`reconstruction_metrics` loop; SSIM is torchmetrics', LPIPS the `lpips` package's VGG network.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision.utils import save_image

import data
from stage1_tokenizer import VQGAN
from stage1_tokenizer.perceptual import PerceptualWeightsMissing, build_lpips
from stage1_tokenizer.reconstruct import reconstruction_metrics, save_comparison_grid


def held_out_loader(spec: str, resolution: int, *, split: str = "val", limit: int | None = 1000,
                    batch_size: int = 64) -> DataLoader:
    """The first `limit` images of a source's split, in their natural order (no augmentation)."""
    dataset = data.build_dataset(spec, resolution=resolution, split=split, shuffle=False)
    if limit is not None:
        if isinstance(dataset, IterableDataset):
            source = dataset

            class _Head(IterableDataset):
                def __iter__(self):
                    return itertools.islice(iter(source), limit)
            dataset = _Head()
        elif limit < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VQGAN, spec: str, out_dir: str | Path, *, split: str = "val",
                       limit: int | None = 1000, batch_size: int = 64, device: str = "cpu",
                       lpips_weights: str | None = None, grid_images: int = 16, progress: bool = True) -> dict:
    """Reconstruct held-out images; write OUT/recon/NNNNNN.png, OUT/real/NNNNNN.png (the originals
    at the same size, for rFID) and OUT/grid.png. LPIPS is None, with `lpips_skipped` saying why,
    when its VGG backbone cannot be had (no download and no VQGAN_LPIPS_VGG file)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    out_dir = Path(out_dir)
    for sub in ("recon", "real"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    try:
        lpips_net = build_lpips(lpips_weights).to(device)
        lpips_skipped = None
    except PerceptualWeightsMissing as e:
        lpips_net, lpips_skipped = None, str(e).splitlines()[0]
        warnings.warn(f"LPIPS skipped: {lpips_skipped}", stacklevel=2)
    ssim_sum = lpips_sum = 0.0
    written = 0
    shown: list[torch.Tensor] = []

    def on_batch(images: torch.Tensor, recon: torch.Tensor) -> None:
        nonlocal ssim_sum, lpips_sum, written
        recon = recon.float().clamp(-1, 1)
        ssim_sum += ssim((recon + 1) / 2, (images.float() + 1) / 2, data_range=1.0, reduction="none").sum().item()
        if lpips_net is not None:
            lpips_sum += lpips_net(recon, images.float()).sum().item()
        for real, fake in zip(images.cpu(), recon.cpu()):
            save_image((real + 1) / 2, out_dir / "real" / f"{written:06d}.png")
            save_image((fake + 1) / 2, out_dir / "recon" / f"{written:06d}.png")
            written += 1
        if sum(len(s[0]) for s in shown) < grid_images:
            shown.append((images.cpu(), recon.cpu()))

    loader = held_out_loader(spec, tokenizer.config.resolution, split=split, limit=limit, batch_size=batch_size)
    tokenizer = tokenizer.to(device)
    results = reconstruction_metrics(tokenizer, loader, device=device, progress=progress, on_batch=on_batch)
    n = results["images"]
    originals = torch.cat([a for a, _ in shown])[:grid_images]
    reconstructions = torch.cat([b for _, b in shown])[:grid_images]
    save_comparison_grid(originals, reconstructions, out_dir / "grid.png")
    results.update(ssim=ssim_sum / n, lpips=lpips_sum / n if lpips_net is not None else None,
                   lpips_skipped=lpips_skipped, source=spec, split=split, resolution=tokenizer.config.resolution,
                   recon_dir=str(out_dir / "recon"), real_dir=str(out_dir / "real"))
    return results
