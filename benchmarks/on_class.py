"""On-class accuracy of a class-conditional prior: are samples of the class that was asked for?

    python benchmarks/on_class.py --prior runs/demo/stage2/prior --tokenizer runs/demo/stage1/tokenizer \
        --per-class 10 --cfg 1 2 3 --temperature 1 0.7

Samples `--per-class` images of every class at each guidance scale (KV-cached, fixed seed),
decodes them, and labels them with a small CNN trained on the real images of `--source`
(cached under `--classifier-cache`). Also prints the classifier's own accuracy on held-out
real images and on the tokenizer's reconstructions of them, the ceilings for the samples.
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
from eval.classifier import ClassifierConfig, accuracy, load_or_train_classifier, predict  # noqa: E402
from stage2_prior import generate  # noqa: E402
from stage2_prior.images import load_pair  # noqa: E402

TINY_SOURCE = "synthetic:shapes?shape_size=0.55-0.85&textures=plain&layout=centered"  # configs/tiny.yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--source", default=TINY_SOURCE,
                        help="real images the classifier learns from (default: the tiny preset's)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[None],
                        help="masked priors: decoding passes T to compare (default: the sampler's 8)")
    parser.add_argument("--choice-temperature", type=float, default=None, help="masked priors: confidence noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-cache", type=Path, default=REPO / "runs" / "classifier")
    parser.add_argument("--classifier-width", type=int, default=ClassifierConfig.width)
    parser.add_argument("--classifier-steps", type=int, default=ClassifierConfig.steps)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=args.device)
    resolution = tokenizer.config.resolution
    num_classes = prior.config.num_classes
    if num_classes == 0:
        raise SystemExit("this prior is unconditional: on-class accuracy needs a class-conditional prior")
    classifier = load_or_train_classifier(ClassifierConfig(source=args.source, resolution=resolution,
                                                           num_classes=num_classes, width=args.classifier_width,
                                                           steps=args.classifier_steps), args.classifier_cache)
    real_acc = accuracy(classifier, args.source, resolution, split="val", limit=500)
    val = data.build_dataset(args.source, resolution=resolution, split="val", shuffle=False)
    images, labels = map(torch.stack, zip(*[(val[i][0], torch.tensor(val[i][1])) for i in range(200)]))
    recon = tokenizer.decode(tokenizer.encode(images.to(args.device))).cpu()
    recon_acc = (predict(classifier, recon) == labels).float().mean().item()

    print(f"prior {args.prior}: {prior.num_parameters() / 1e6:.2f}M params, {num_classes} classes, "
          f"{prior.seq_len} tokens per image")
    print(f"classifier accuracy: real held-out {100 * real_acc:.1f}%, tokenizer reconstructions {100 * recon_acc:.1f}%")
    masked = prior.prior_type == "masked"
    if not masked and args.steps != [None]:
        raise SystemExit("--steps applies to masked priors; this prior is autoregressive")
    print(f"\n| {'steps | ' if masked else ''}guidance | temperature | on-class accuracy "
          f"({args.per_class} x {num_classes} samples) | sampling s |")
    print("|---|---|---|---|" + ("---|" if masked else ""))
    asked = torch.arange(num_classes).repeat_interleave(args.per_class)
    decode = {"choice_temperature": args.choice_temperature} if masked else {}
    for steps in args.steps:
        for temperature in args.temperature:
            for scale in args.cfg:
                t0 = time.perf_counter()
                codes = generate(prior, labels=asked.to(args.device), cfg_scale=scale, temperature=temperature,
                                 top_k=args.top_k, seed=args.seed, **decode, **({"steps": steps} if masked else {}))
                seconds = time.perf_counter() - t0
                hits = (predict(classifier, tokenizer.decode(codes).cpu()) == asked).float().mean().item()
                print(f"| {(str(steps or 8) + ' | ') if masked else ''}{scale:g} | {temperature:g} | "
                      f"{100 * hits:.1f}% | {seconds:.1f} |")


if __name__ == "__main__":
    main()
