"""Does generated data help a small classifier? k real images per class, with and without samples.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/augment.py [--k 20 100] [--seeds 0 1 2] [--synthetic 0.5] [--out runs/bench-augment]

On the CIFAR-10 subset in ../shared/assets (or --train / --test):
1. a tokenizer (the tiny preset on CIFAR, `--tokenizer-steps`; or `--tokenizer DIR`), the codes of
   the whole train subset, and a class-conditional prior on them (`--prior-steps`), all through
   the `vqgan` console script and skipped when already in --out;
2. `vqgan augment` writes `--generated` samples per class (guidance `--cfg`);
3. for each k, a SmallCNN (eval/classifier.py) trains on the first k real images per class, once
   alone and once on `mix:REAL|GENERATED?synthetic=F` (the `data` mixing source), with the same
   steps, batch and seed, and is tested on the held-out test file.

Read the result with its setup in mind: the generator saw the whole train subset (4,660 images),
more than the k per class the classifier gets, so a gain measures what the generator passes on
from that larger set, as in "train a generator on what you have, augment a small labelled split".
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402
from eval.classifier import ClassifierConfig, accuracy, train_classifier  # noqa: E402

ASSETS = REPO.parent / "shared" / "assets" / "cifar10-partial"


def vqgan(*args: str, log: Path) -> None:
    """Run a `vqgan` subcommand, its output to `log`; exit with the log's tail on failure."""
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "vqgan", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"vqgan {args[0]} failed ({log}):\n" + log.read_text()[-3000:])


def real_subset(train: Path, k: int, out: Path) -> Path:
    """The first k images of each class of `train` as an npz (labels kept)."""
    path = out / f"real-k{k}.npz"
    if not path.is_file():
        with np.load(train) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        chosen = np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(int(labels.max()) + 1)])
        np.savez(path, images=images[chosen], labels=labels[chosen])
    return path


def build_generator(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """Tokenizer, codes and prior for the train subset, each made only when absent -> (prior, tokenizer)."""
    train_spec = f"npz:{args.train}?classes=cifar10"
    tokenizer = args.tokenizer or out / "stage1" / "tokenizer"
    if not (tokenizer / "config.json").is_file():
        print(f"training the tokenizer ({args.tokenizer_steps} steps) ...", flush=True)
        vqgan("train-tokenizer", "--config", "configs/tiny.yaml", f"data.source={train_spec}",
              f"train.steps={args.tokenizer_steps}", f"train.out_dir={out / 'stage1'}", log=out / "tokenizer.log")
    codes = out / "codes"
    if not (codes / "manifest.json").is_file() or not json.loads((codes / "manifest.json").read_text()).get("complete"):
        vqgan("encode", "--tokenizer", str(tokenizer), "--data", train_spec, "--out", str(codes), "--flip",
              log=out / "encode.log")
    prior = out / "stage2" / "prior"
    if not (prior / "config.json").is_file():
        print(f"training the prior ({args.prior_steps} steps) ...", flush=True)
        vqgan("train-prior", "--config", "configs/tiny.yaml", f"data.codes={codes}", f"data.tokenizer={tokenizer}",
              f"train.steps={args.prior_steps}", f"train.out_dir={out / 'stage2'}", log=out / "prior.log")
    return prior, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=ASSETS / "train.npz")
    parser.add_argument("--test", type=Path, default=ASSETS / "test.npz")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-augment")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer to use instead of training one")
    parser.add_argument("--tokenizer-steps", type=int, default=900)
    parser.add_argument("--prior-steps", type=int, default=1500)
    parser.add_argument("--generated", type=int, default=200, help="generated images per class")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 100], help="real images per class")
    parser.add_argument("--synthetic", type=float, default=0.5, help="share of generated images in each epoch")
    parser.add_argument("--steps", type=int, default=600, help="classifier steps (batch 64)")
    parser.add_argument("--width", type=int, default=32, help="classifier width")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for path in (args.train, args.test):
        if not path.is_file():
            sys.exit(f"{path} is absent: pass --train / --test (npz with 'images' and 'labels')")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    prior, tokenizer = build_generator(args, out)
    generated = out / f"generated-{args.generated}-cfg{args.cfg:g}"
    vqgan("augment", "--prior", str(prior), "--tokenizer", str(tokenizer), "--per-class", str(args.generated),
          "--cfg", str(args.cfg), "--out", str(generated), log=out / "augment.log")
    print(machine_header())
    print(f"generator ready in {(time.perf_counter() - t0) / 60:.1f} min; {args.generated} generated images per "
          f"class at guidance {args.cfg}; classifier width {args.width}, {args.steps} steps of 64, seeds {args.seeds}; "
          f"test: {args.test} \n")
    test_spec = f"npz:{args.test}?classes=cifar10"
    print(f"| real per class | real only | real + generated ({args.synthetic:.0%} of each epoch) | difference |")
    print("|---|---|---|---|")
    for k in args.k:
        real = f"npz:{real_subset(args.train, k, out)}?classes=cifar10"
        mixed = f"mix:{real}|folder:{generated}?val_fraction=0?synthetic={args.synthetic}"
        scores = {}
        for name, spec in (("real", real), ("mixed", mixed)):
            scores[name] = [accuracy(train_classifier(ClassifierConfig(source=spec, resolution=32, num_classes=10,
                                                                       width=args.width, steps=args.steps, seed=seed),
                                                      progress=False), test_spec, 32, split="test", limit=100_000)
                            for seed in args.seeds]
        fmt = lambda v: f"{100 * statistics.mean(v):.1f} % ± {100 * statistics.pstdev(v):.1f}"  # noqa: E731
        diff = [m - r for m, r in zip(scores["mixed"], scores["real"])]
        print(f"| {k} | {fmt(scores['real'])} | {fmt(scores['mixed'])} | {100 * statistics.mean(diff):+.1f} points |",
              flush=True)


if __name__ == "__main__":
    main()
