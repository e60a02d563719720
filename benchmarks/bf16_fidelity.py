"""Does bf16 autocast cost reconstruction quality? PSNR of a trained tokenizer in fp32 and in bf16.

    python benchmarks/bf16_fidelity.py --tokenizer runs/demo/tokenizer \
        [--source npz:../shared/assets/cifar10-partial/test.npz] [--limit 1000] [--resolution 32]

Encodes and decodes the same held-out images twice, in fp32 and under bf16 autocast (the
quantizer's distances stay fp32 inside the model either way), and prints the mean PSNR of each
against the originals, the PSNR between the two reconstructions and how many codes changed. The
acceptance bar of issue 11 is |fp32 - bf16| <= 0.5 dB on the CIFAR subset. The default source is
the CIFAR-10 subset of ../shared/assets (or $VQGAN_CIFAR_NPZ); the script stops with a message
naming the path when it is missing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402
from eval.tokenizer_eval import held_out_loader  # noqa: E402
from stage1_tokenizer import VQGAN  # noqa: E402
from stage1_tokenizer.reconstruct import psnr  # noqa: E402

DEFAULT_CIFAR = REPO.parent / "shared" / "assets" / "cifar10-partial" / "test.npz"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (config.json + safetensors)")
    parser.add_argument("--source", default=None, help="image source spec (default: the CIFAR-10 subset)")
    parser.add_argument("--split", default="train", help="split of the source (an npz file is one split)")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's own")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    source = args.source
    if source is None:
        path = Path(os.environ.get("VQGAN_CIFAR_NPZ", DEFAULT_CIFAR))
        if not path.is_file():
            sys.exit(f"no CIFAR subset at {path}: pass --source SPEC or set VQGAN_CIFAR_NPZ")
        source = f"npz:{path}"
    model = VQGAN.from_pretrained(args.tokenizer, device=args.device).eval()
    resolution = args.resolution or model.config.resolution
    loader = held_out_loader(source, resolution, split=args.split, limit=args.limit, batch_size=args.batch_size)
    print(machine_header())
    print(f"tokenizer {args.tokenizer}, source {source} ({args.split}), {resolution} px\n")

    sums = {"fp32": 0.0, "bf16": 0.0, "between": 0.0}
    changed = total = images = 0
    for batch in loader:
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(args.device)
        codes32 = model.encode(x)
        recon32 = model.decode(codes32).float().clamp(-1, 1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            codes16 = model.encode(x)
            recon16 = model.decode(codes16)
        recon16 = recon16.float().clamp(-1, 1)
        sums["fp32"] += psnr(recon32, x).sum().item()
        sums["bf16"] += psnr(recon16, x).sum().item()
        sums["between"] += psnr(recon16, recon32).clamp(max=100).sum().item()
        changed += (codes16 != codes32).sum().item()
        total += codes32.numel()
        images += x.shape[0]
    if images == 0:
        sys.exit(f"{source} gave no images")
    fp32, bf16 = sums["fp32"] / images, sums["bf16"] / images
    print("| images | PSNR fp32 dB | PSNR bf16 dB | difference dB | PSNR bf16 vs fp32 recon dB | codes changed |")
    print("|---|---|---|---|---|---|")
    print(f"| {images} | {fp32:.2f} | {bf16:.2f} | {bf16 - fp32:+.3f} | {sums['between'] / images:.1f} | "
          f"{100 * changed / total:.2f} % |")


if __name__ == "__main__":
    main()
