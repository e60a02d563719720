"""Class transfer in code space: how many resampled codes it takes to turn an image into another class.

    python benchmarks/class_transfer.py --prior runs/demo/stage2/prior --tokenizer runs/demo/stage1/tokenizer \
        [--count 200] [--fractions 0.25 0.5 0.625 0.75 0.875] [--cfg 3] [--orders raster random]

Takes `--count` held-out images of `--source` (the val split, every class alike), encodes them, and
for each resampled fraction keeps the rest of the codes and resamples that fraction under a target
class (image i goes to class (label + 1 + i mod (C - 1)) mod C, so every pair of classes occurs)
with classifier-free guidance (`stage2_prior.edit.class_transfer`). A small CNN trained on the real
images (`eval.classifier`, cached under `--classifier-cache`) labels the decoded results. The table
gives, per order and fraction, the share labelled with the target class and the share still
labelled with the source class, whether every kept code is unchanged, and the PSNR of the result
against the plain reconstruction over the kept positions more than one position from the edit. "raster" resamples the last positions in raster order (the prior
reads the kept top first); "random" resamples a seeded random subset; "center" resamples the
positions nearest the centre, keeping the surroundings (for centred objects, the background).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from benchmarks._common import machine_header  # noqa: E402
from eval.classifier import ClassifierConfig, load_or_train_classifier, predict  # noqa: E402
from stage2_prior import generate  # noqa: E402
from stage2_prior.edit import class_transfer, fraction_mask  # noqa: E402
from stage2_prior.edit_images import kept_region_psnr  # noqa: E402
from stage2_prior.images import load_pair  # noqa: E402

TINY_SOURCE = "synthetic:shapes?shape_size=0.55-0.85&textures=plain&layout=centered"  # configs/tiny.yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, default=REPO / "runs" / "demo" / "stage2" / "prior")
    parser.add_argument("--tokenizer", type=Path, default=REPO / "runs" / "demo" / "stage1" / "tokenizer")
    parser.add_argument("--source", default=TINY_SOURCE, help="held-out images and the classifier's training data")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.625, 0.75, 0.875])
    parser.add_argument("--orders", nargs="+", default=["raster", "random", "center"], choices=["raster", "random", "center"])
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-cache", type=Path, default=REPO / "runs" / "classifier-transfer")
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    for path in (args.prior, args.tokenizer):
        if not (path / "config.json").is_file():
            sys.exit(f"{path} holds no model; train one first: vqgan run --config configs/tiny.yaml --out runs/demo")
    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=args.device)
    C, resolution = prior.config.num_classes, tokenizer.config.resolution
    if C < 2:
        sys.exit("class transfer needs a class-conditional prior with at least two classes")
    classifier = load_or_train_classifier(ClassifierConfig(source=args.source, resolution=resolution, num_classes=C,
                                                           steps=args.classifier_steps), args.classifier_cache)
    val = data.build_dataset(args.source, resolution=resolution, split="val", shuffle=False)
    count = min(args.count, len(val))
    images, labels = map(torch.stack, zip(*[(val[i][0], torch.tensor(val[i][1])) for i in range(count)]))
    targets = (labels + 1 + torch.arange(count) % (C - 1)) % C
    codes = tokenizer.encode(images.to(args.device))

    print(machine_header())
    print(f"prior {args.prior} ({C} classes, code grid {tuple(prior.code_shape)}), {count} held-out images of "
          f"{args.source}; guidance {args.cfg}, temperature {args.temperature}, seed {args.seed}")
    recon_images = tokenizer.decode(codes).cpu()
    recon = predict(classifier, recon_images)
    fresh = predict(classifier, tokenizer.decode(generate(prior, labels=targets.to(args.device), cfg_scale=args.cfg,
                                                          temperature=args.temperature, seed=args.seed)).cpu())
    print(f"classifier on reconstructions: {100 * (recon == labels).float().mean():.1f}% source class; "
          f"on fresh samples of the target classes: {100 * (fresh == targets).float().mean():.1f}% target class\n")
    print("| order | resampled fraction | labelled target | still labelled source | kept codes identical "
          "| kept-region PSNR dB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for order in args.orders:
        for fraction in args.fractions:
            t0 = time.perf_counter()
            moved = class_transfer(prior, codes, targets.to(args.device), resample_fraction=fraction, order=order,
                                   cfg_scale=args.cfg, temperature=args.temperature, seed=args.seed)
            decoded = tokenizer.decode(moved).cpu()
            predicted = predict(classifier, decoded)
            mask = fraction_mask(tuple(codes.shape[1:3]), fraction, order, args.seed).to(codes.device)
            kept_same = bool((moved[:, ~mask] == codes[:, ~mask]).all())
            psnr = kept_region_psnr(decoded, recon_images, mask.cpu(), tokenizer.code_factor)
            print(f"| {order} | {fraction:.3f} | {100 * (predicted == targets).float().mean():.1f}% "
                  f"| {100 * (predicted == labels).float().mean():.1f}% | {'yes' if kept_same else 'NO'} "
                  f"| {'n/a' if psnr is None else f'{psnr:.1f}'} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
