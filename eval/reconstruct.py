"""Reconstruct a folder of images with a pretrained tokenizer (the `vqgan reconstruct` command)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from common import atomic_write_json
from data import ImageFolderDataset
from stage1_tokenizer import VQGAN
from stage1_tokenizer.reconstruct import reconstruction_metrics, save_comparison_grid


@torch.no_grad()
def reconstruct_folder(tokenizer_dir: str | Path, images_dir: str | Path, out_dir: str | Path, *,
                       resolution: int | None = None, batch_size: int = 32, device: str = "cpu",
                       grid_images: int = 16) -> dict:
    """Write OUT/recon/NNNNNN.png for every image (in sorted file order), OUT/grid.png (originals
    over reconstructions) and OUT/metrics.json (PSNR vs the mean-colour baseline, codebook usage)."""
    model = VQGAN.from_pretrained(tokenizer_dir, device=device)
    resolution = resolution or model.config.resolution
    dataset = ImageFolderDataset(images_dir, resolution=resolution, split="train", val_fraction=0.0)
    out_dir = Path(out_dir)
    (out_dir / "recon").mkdir(parents=True, exist_ok=True)
    shown: list[tuple[torch.Tensor, torch.Tensor]] = []
    written = 0

    def keep(images: torch.Tensor, recon: torch.Tensor) -> None:
        nonlocal written
        for image in recon.cpu():
            save_image((image + 1) / 2, out_dir / "recon" / f"{written:06d}.png")
            written += 1
        if sum(len(a) for a, _ in shown) < grid_images:
            shown.append((images.cpu(), recon.cpu()))

    results = reconstruction_metrics(model, DataLoader(dataset, batch_size=batch_size), device=device,
                                     progress=True, on_batch=keep)
    real = torch.cat([a for a, _ in shown])[:grid_images]
    fake = torch.cat([b for _, b in shown])[:grid_images]
    save_comparison_grid(real, fake, out_dir / "grid.png")
    results.update({"tokenizer": str(tokenizer_dir), "images_dir": str(images_dir), "resolution": resolution,
                    "skipped_files": list(getattr(dataset, "skipped_files", []))})
    atomic_write_json(out_dir / "metrics.json", results)
    return results
