"""The generator step with VQGAN's adaptive GAN weight: taming's two passes vs `generator_loss`'s one.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 VQGAN_LPIPS_VGG=... \
        python benchmarks/gan_step.py [--config configs/tiny.yaml] [--batch 32] [--repeats 8]

taming computes d rec/d last_layer and d gan/d last_layer through the whole LPIPS and
discriminator graphs, then backpropagates the total through them again. `generator_loss` takes
both gradients at the reconstruction (one pass through each), reaches the last layer by the short
path, and backpropagates the pulled-back gradient (tests/test_losses.py checks the gradients are
taming's). Prints the median generator step (forward + loss + backward) of each, alternated twice.
"""
from __future__ import annotations

import argparse
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
from stage1_tokenizer.losses import VQGANLoss, adaptive_gan_weight  # noqa: E402
from stage1_tokenizer.train import TokenizerTrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(TokenizerTrainConfig, args.config, ["loss.perceptual_weight=1.0"], section="tokenizer")
    model, loss = VQGAN(cfg.model), VQGANLoss(cfg.loss)
    disc = NLayerDiscriminator(channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers).requires_grad_(False)
    R = cfg.model.resolution
    images = torch.rand(args.batch, 3, R, R) * 2 - 1

    def one_pass() -> None:
        recon, quant = model(images)
        total, _ = loss.generator_loss(images, recon, quant.loss, step=10**9, last_layer=model.last_layer,
                                       discriminator=disc)
        total.backward()

    def two_passes() -> None:  # taming's recipe, as the reference in tests/test_losses.py
        recon, quant = model(images)
        diff = images - recon
        rec = cfg.loss.l1_weight * diff.abs().mean() + cfg.loss.perceptual_weight * loss.perceptual_loss(images, recon)
        g_loss = loss.g_loss_fn(disc(recon))
        weight = cfg.loss.disc_weight * adaptive_gan_weight(rec, g_loss, model.last_layer)
        (rec + cfg.loss.codebook_weight * quant.loss.mean() + weight * g_loss).backward()

    print(machine_header())
    print(f"{args.config}: batch {args.batch}, {R} px, LPIPS + GAN, fp32, median of {args.repeats}\n")
    print("| round | taming's two passes, ms | one pass, ms | speed-up |")
    print("|---|---|---|---|")
    for round_ in (1, 2):
        medians = []
        for fn in (two_passes, one_pass):
            fn()
            model.zero_grad(set_to_none=True)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
            medians.append(1000 * statistics.median(times))
        print(f"| {round_} | {medians[0]:.0f} | {medians[1]:.0f} | {medians[0] / medians[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
