"""Parameter counts of every tokenizer preset, and training images/s of one preset on this machine.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/tokenizer_presets.py --preset cifar32 --steps 10
    python benchmarks/tokenizer_presets.py --preset imagenet256-f16 --device cuda --precision bf16

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

from benchmarks._common import machine_header  # noqa: E402

from common import load_config  # noqa: E402
from stage1_tokenizer import VQGAN  # noqa: E402
from stage1_tokenizer.discriminator import NLayerDiscriminator  # noqa: E402
from stage1_tokenizer.losses import VQGANLoss  # noqa: E402
from stage1_tokenizer.perceptual import build_lpips  # noqa: E402
from stage1_tokenizer.train import TokenizerTrainConfig  # noqa: E402


def time_training_step(cfg: TokenizerTrainConfig, steps: int, warmup: int, gan: bool, device: str,
                       precision: str) -> tuple[float, float]:
    """(images/s, peak GPU memory in GiB or nan) of the generator (+ discriminator) step."""
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = VQGAN(cfg.model).train().to(device, memory_format=fmt)
    disc = NLayerDiscriminator(cfg.model.out_channels, cfg.loss.disc_channels, cfg.loss.disc_layers,
                               cfg.loss.disc_norm).to(device, memory_format=fmt)
    lpips_model = None
    if cfg.loss.perceptual_weight > 0:
        lpips_model = build_lpips(os.environ.get("VQGAN_LPIPS_VGG") or None,
                                  random_backbone=not os.environ.get("VQGAN_LPIPS_VGG"))
    loss_fn = VQGANLoss(cfg.loss, lpips_model=lpips_model).to(device)
    fused = device.startswith("cuda") or None
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=fused)
    bs, res = cfg.train.batch_size, cfg.model.resolution
    images = (torch.rand(bs, 3, res, res, device=device) * 2 - 1).contiguous(memory_format=fmt)
    step = cfg.loss.disc_start if gan else 0
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        disc.requires_grad_(False)
        with autocast:
            recon, quant = model(images)
            loss, _ = loss_fn.generator_loss(images, recon, quant.loss, step=step, last_layer=model.last_layer,
                                             discriminator=disc if gan else None)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if gan:
            disc.requires_grad_(True)
            with autocast:
                d_loss, _ = loss_fn.discriminator_loss(images, recon.detach(), step=step, discriminator=disc)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return bs / statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar32", help="configs/<preset>.yaml to time")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    print(machine_header())

    print("\n| preset | tokenizer params | discriminator params | image -> codes |")
    print("|---|---|---|---|")
    for path in sorted((REPO / "configs").glob("*.yaml")):
        try:
            cfg = load_config(TokenizerTrainConfig, path, section="tokenizer")
        except Exception:  # presets of other stages
            continue
        model = VQGAN(cfg.model)
        disc = NLayerDiscriminator(3, cfg.loss.disc_channels, cfg.loss.disc_layers, cfg.loss.disc_norm)
        h, w = model.code_grid(cfg.model.resolution)
        print(f"| {path.stem} | {model.num_parameters() / 1e6:.2f}M | "
              f"{sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M | "
              f"{cfg.model.resolution}px -> {h}x{w} of {cfg.model.quantizer.codebook_size} |")

    overrides = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    cfg = load_config(TokenizerTrainConfig, REPO / "configs" / f"{args.preset}.yaml", overrides, section="tokenizer")
    lp = "LPIPS" if cfg.loss.perceptual_weight > 0 else "no LPIPS"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nTraining step, preset {args.preset}, {cfg.model.resolution} px, batch {cfg.train.batch_size}, "
          f"{args.precision}, channels_last, {device_name}, median of {args.steps} after {args.warmup} warm-up")
    print("| phase | images/s | peak GPU memory (GiB) |")
    print("|---|---|---|")
    for gan, name in ((False, f"before disc_start (L1 + {lp} + quantizer)"),
                      (True, "after disc_start (+ PatchGAN G and D steps)")):
        ips, peak = time_training_step(cfg, args.steps, args.warmup, gan, args.device, args.precision)
        print(f"| {name} | {ips:.1f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
