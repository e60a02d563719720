"""Parameter counts of every tokenizer preset, and training images/s of one preset on this machine.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/tokenizer_presets.py --preset cifar32 --steps 10

Times the real training step of `stage1_tokenizer.train` (generator step, then discriminator
step when the GAN is on) on random 32 px images, median over `--steps` after `--warmup`.
LPIPS uses $VQGAN_LPIPS_VGG when set, else a random VGG backbone (same cost, no download).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import load_config  # noqa: E402
from stage1_tokenizer import VQGAN  # noqa: E402
from stage1_tokenizer.discriminator import NLayerDiscriminator  # noqa: E402
from stage1_tokenizer.losses import VQGANLoss  # noqa: E402
from stage1_tokenizer.perceptual import build_lpips  # noqa: E402
from stage1_tokenizer.train import TokenizerTrainConfig  # noqa: E402


def machine_header() -> str:
    load = os.getloadavg()[0]
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    warn = "  WARNING: machine busy, numbers unreliable" if load > 0.5 else ""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {load:.2f}{warn}\n"
            f"malloc settings: {malloc or 'glibc defaults'}")


def time_training_step(cfg: TokenizerTrainConfig, steps: int, warmup: int, gan: bool) -> float:
    torch.manual_seed(0)
    model = VQGAN(cfg.model).train()
    disc = NLayerDiscriminator(cfg.model.out_channels, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm)
    lpips_model = None
    if cfg.loss.perceptual_weight > 0:
        lpips_model = build_lpips(os.environ.get("VQGAN_LPIPS_VGG") or None,
                                  random_backbone=not os.environ.get("VQGAN_LPIPS_VGG"))
    loss_fn = VQGANLoss(cfg.loss, lpips_model=lpips_model)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    bs, res = cfg.train.batch_size, cfg.model.resolution
    images = torch.rand(bs, 3, res, res) * 2 - 1
    step = cfg.loss.disc_start if gan else 0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        disc.requires_grad_(False)
        recon, quant = model(images)
        loss, _ = loss_fn.generator_loss(images, recon, quant.loss, step=step, last_layer=model.last_layer,
                                         discriminator=disc if gan else None)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if gan:
            disc.requires_grad_(True)
            d_loss, _ = loss_fn.discriminator_loss(images, recon.detach(), step=step, discriminator=disc)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return bs / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar32", help="configs/<preset>.yaml to time")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(machine_header())

    print("\n| preset | tokenizer params | discriminator params | image -> codes |")
    print("|---|---|---|---|")
    for path in sorted((REPO / "configs").glob("*.yaml")):
        try:
            cfg = load_config(TokenizerTrainConfig, path)
        except Exception:  # presets of other stages
            continue
        model = VQGAN(cfg.model)
        disc = NLayerDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm)
        h, w = model.code_grid(cfg.model.resolution)
        print(f"| {path.stem} | {model.num_parameters() / 1e6:.2f}M | "
              f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M | "
              f"{cfg.model.resolution}px -> {h}x{w} of {cfg.model.quantizer.codebook_size} |")

    cfg = load_config(TokenizerTrainConfig, REPO / "configs" / f"{args.preset}.yaml")
    lp = "LPIPS" if cfg.loss.perceptual_weight > 0 else "no LPIPS"
    print(f"\nTraining step, preset {args.preset}, batch {cfg.train.batch_size}, fp32, "
          f"median of {args.steps} after {args.warmup} warm-up")
    print("| phase | images/s |")
    print("|---|---|")
    print(f"| before disc_start (L1 + {lp} + quantizer) | {time_training_step(cfg, args.steps, args.warmup, False):.1f} |")
    print(f"| after disc_start (+ PatchGAN G and D steps) | {time_training_step(cfg, args.steps, args.warmup, True):.1f} |")


if __name__ == "__main__":
    main()
