"""Tokens/s of KV-cached vs uncached sampling from the GPT prior, 256 tokens (16x16 codes).

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/prior_cache_speed.py [--batch 4 16] [--gpt-b] [--threads N] [--repeats 3]

Default model: dim 256, depth 4, heads 4, 1,024 codes (3.7M parameters); `--gpt-b` uses LlamaGen's
GPT-B shape (768 wide, 12 layers, 12 heads) and is slow uncached on a CPU (minutes). Randomly
initialised weights: the speed does not depend on them. Both paths sample the same seed, so the
table also says whether they produced the same codes. The cached path is the best of `--repeats`
runs after one warm-up; the uncached one runs once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402

from stage2_prior import PRIOR_SIZES, GPTPrior, PriorConfig, generate  # noqa: E402


def time_sampling(prior: GPTPrior, batch: int, use_cache: bool, runs: int) -> tuple[float, torch.Tensor]:
    """Best wall time over `runs` calls of generate, and the codes of the last call."""
    best, codes = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        codes = generate(prior, batch, seed=0, top_k=100, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return best, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="batch sizes to time, e.g. --batch 4 16")
    parser.add_argument("--gpt-b", action="store_true", help="LlamaGen GPT-B shape (768 x 12, 12 heads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    size = PRIOR_SIZES["GPT-B"] if args.gpt_b else dict(dim=256, depth=4, heads=4)
    torch.manual_seed(0)
    prior = GPTPrior(PriorConfig(vocab_sizes=(1024,), code_shape=(16, 16), **size)).eval()
    print(machine_header())
    print(f"model: dim {size['dim']}, depth {size['depth']}, heads {size['heads']}, "
          f"{prior.num_parameters() / 1e6:.1f}M parameters; {prior.seq_len} tokens per sample, top_k 100, fp32, CPU\n")
    print(f"| {'batch':>5} | {'cached s':>8} | {'cached tok/s':>12} | {'uncached s':>10} | {'uncached tok/s':>14} "
          f"| {'speed-up':>8} | same codes |")
    print(f"|{'-' * 7}|{'-' * 10}|{'-' * 14}|{'-' * 12}|{'-' * 16}|{'-' * 10}|{'-' * 12}|")
    for batch in args.batch:
        generate(prior, batch, seed=0)  # warm-up (allocator, kernels)
        cached_s, cached_codes = time_sampling(prior, batch, True, args.repeats)
        uncached_s, uncached_codes = time_sampling(prior, batch, False, 1)
        tokens = batch * prior.seq_len
        same = "yes" if torch.equal(cached_codes, uncached_codes) else "NO"
        print(f"| {batch:>5} | {cached_s:8.2f} | {tokens / cached_s:12.1f} | {uncached_s:10.2f} | "
              f"{tokens / uncached_s:14.1f} | {uncached_s / cached_s:7.1f}x | {same:>10} |", flush=True)
    print(f"\nload avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
