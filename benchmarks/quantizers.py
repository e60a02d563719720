"""Quantizers compared at equal training steps (and near-equal bits per image), one table (issue 7).

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/quantizers.py [--source synthetic:shapes?...] [--steps 900] [--only vq-l2 fsq ...]
    ... python benchmarks/quantizers.py --codebook-sweep      # VQ at 512 / 4,096 / 16,384 / 65,536 codes

Each variant trains the tiny preset's tokenizer (configs/tiny.yaml, 32 px, 8x8 grid) for `--steps`
steps through `vqgan train-tokenizer` with one quantizer override, then `vqgan evaluate tokenizer`
measures PSNR, LPIPS (when the VGG backbone is available: $VQGAN_LPIPS_VGG), rFID on `--eval-count`
held-out images (when the Inception weights are: $VQGAN_INCEPTION_WEIGHTS), codebook usage and
perplexity. Training images/s is steps x batch over the training wall time (start-up and the final
evaluation included). Peak memory is the training process's maximum RSS. Runs go to `--out`; a
variant whose tokenizer already exists there is evaluated without retraining (`--retrain` forces).
Bits per image = positions x sum(log2 vocab) per position; the default variants hold 8x8 x 8 bits,
except rvq-d4 (4x, for the "RVQ beats VQ at the same codebook" check) and vqvae2 (4x4 top + 8x8
bottom codes of 64).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402

Q = "model.quantizer."
VARIANTS = {
    "vq": [f"{Q}l2_normalize=false", f"{Q}code_dim=32"],
    "vq-l2": [],                                               # the tiny preset: l2-normalised 8-d codes
    "vq-ema": [f"{Q}use_ema=true", f"{Q}l2_normalize=false", f"{Q}code_dim=32"],
    "rvq-d2": [f"{Q}type=rvq", f"{Q}depth=2", f"{Q}codebook_size=16", f"{Q}code_dim=32"],
    "rvq-d4": [f"{Q}type=rvq", f"{Q}depth=4", f"{Q}codebook_size=256", f"{Q}code_dim=32"],
    "fsq": [f"{Q}type=fsq", f"{Q}levels=[4,4,4,4]"],
    "lfq": [f"{Q}type=lfq", f"{Q}codebook_size=256"],
    "vqvae2": [f"{Q}type=vqvae2", f"{Q}codebook_size=64", f"{Q}code_dim=8"],
    "vqvae": ["--config", "configs/tiny-vqvae.yaml"],          # VQ-VAE's objective, tiny's codebook
    # VQGAN's full objective on vq-l2's codebook: LPIPS on and the discriminator early enough to act
    # within a short run (the tiny preset starts it at step 600 and trains offline without LPIPS)
    "vqgan": ["loss.perceptual_weight=1.0", "loss.disc_start=150"],
}
SWEEP = {f"vq-{k}": [f"{Q}codebook_size={k}"] for k in (512, 4096, 16384, 65536)}


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Run a vqgan command; -> (wall seconds, peak RSS MB of the child). Exits with the log's tail on failure."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vqgan", *command], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the maximum over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[:2])} failed ({log}):\n" + log.read_text()[-3000:])
    return wall, usage.ru_maxrss / 1024


def bits_per_image(tokenizer_dir: Path) -> int:
    from stage1_tokenizer import VQGAN
    model = VQGAN.from_pretrained(tokenizer_dir)
    h, w = model.code_grid(model.config.resolution)
    return round(h * w * sum(math.log2(v) for v in model.vocab_sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="synthetic:shapes?shape_size=0.55-0.85&textures=plain&layout=centered")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--eval-count", type=int, default=500)
    parser.add_argument("--eval-source", default=None,
                        help="held-out data (default: --source's val split; an npz source has no split, so pass "
                             "its test file, e.g. npz:../shared/assets/cifar10-partial/test.npz)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quantizers"))
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--codebook-sweep", action="store_true", help="VQ at 512 / 4,096 / 16,384 / 65,536 codes")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    variants = SWEEP if args.codebook_sweep else VARIANTS
    names = args.only or list(variants)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        sys.exit(f"--only: unknown variants {unknown}; choose from {sorted(variants)}")
    eval_source = args.eval_source or args.source
    if eval_source == args.source and args.source.startswith("npz:"):
        sys.exit("--eval-source: an npz source reads the whole file for every split; give the held-out file")
    split = "test" if eval_source.startswith("npz:") else "val"
    if "vqgan" in names and not os.environ.get("VQGAN_LPIPS_VGG"):
        print("vqgan: LPIPS may need $VQGAN_LPIPS_VGG (the VGG16 backbone) on a machine without internet")
    print(machine_header())
    print(f"source {args.source}, {args.steps} steps each, eval on {args.eval_count} held-out images "
          f"({eval_source}, {split})\n")
    print("| quantizer | bits/image | PSNR dB | LPIPS | rFID | usage | perplexity | train img/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        extra = list(variants[name])
        config = ["--config", "configs/tiny.yaml"]
        if extra[:1] == ["--config"]:
            config, extra = extra[:2], extra[2:]
        out = (args.out / name).resolve()
        tokenizer_dir = out / "train" / "tokenizer"
        wall, peak = float("nan"), float("nan")
        if args.retrain or not (tokenizer_dir / "config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            wall, peak = run(["train-tokenizer", *config, *extra, f"train.steps={args.steps}",
                              f"data.source={args.source}", f"train.out_dir={out / 'train'}"], out / "train.log")
        batch = json.loads((out / "train" / "config.json").read_text()).get("train", {}).get("batch_size", 32) \
            if (out / "train" / "config.json").is_file() else 32
        no_fid = [] if os.environ.get("VQGAN_INCEPTION_WEIGHTS") else ["--no-fid"]
        run(["evaluate", "tokenizer", "--tokenizer", str(tokenizer_dir), "--data", eval_source, "--split", split,
             "--count", str(args.eval_count), "--out", str(out / "eval"), *no_fid,
             "--cache-dir", str(args.out.resolve() / "fid-cache")], out / "eval.log")
        m = json.loads((out / "eval" / "metrics.json").read_text())
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        rate = args.steps * batch / wall if wall == wall else None
        print(f"| {name} | {bits_per_image(tokenizer_dir)} | {fmt(m.get('psnr'), '.2f')} | {fmt(m.get('lpips'), '.3f')} "
              f"| {fmt(m.get('rfid'), '.1f')} | {fmt(m.get('codebook_usage'), '.1%')} | {fmt(m.get('perplexity'), '.1f')} "
              f"| {fmt(rate, '.1f')} | {fmt(peak if peak == peak else None, '.0f')} |", flush=True)


if __name__ == "__main__":
    main()
