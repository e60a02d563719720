"""Prior speed at LlamaGen's GPT-B shape, the protocol of issue 11 (compare with LlamaGen on the same CPU).

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/speed_prior.py [--preset gpt-b] [--repeats 5] [--device cpu]

Random weights (speed does not depend on them). Rows:
  * training forward + backward of the cross-entropy on 4 x 256 tokens (fp32, and bf16 autocast);
  * KV-cached sampling of 256 tokens, batch 4, top-k 2000, guidance 1.0 and 4.0 (fp32 weights, and
    bf16 weight copies via `generate(..., weights_dtype=torch.bfloat16)`).
Tokens/s count every generated (or trained) token of the batch; median of `--repeats` runs after a
warm-up. Peak memory is the process's maximum resident set size so far (CPU) or the CUDA peak.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header, median_seconds, native_kernels_line, peak_memory_mb  # noqa: E402
from stage2_prior import GPTPrior, PriorConfig, generate  # noqa: E402

# LlamaGen GPT-B c2i: 12 layers, dim 768, 12 heads, 16,384-code VQ, 16x16 tokens, 1,000 classes
PRESETS = {
    "gpt-b": dict(dim=768, depth=12, heads=12, vocab_sizes=(16384,), code_shape=(16, 16), num_classes=1000),
    "small": dict(dim=256, depth=4, heads=4, vocab_sizes=(1024,), code_shape=(16, 16), num_classes=10),
}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt-b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    prior = GPTPrior(PriorConfig(**PRESETS[args.preset])).to(device)
    L, B = prior.seq_len, args.batch
    print(machine_header())
    print(native_kernels_line())
    print(f"preset {args.preset}: {prior.num_parameters() / 1e6:.1f}M parameters, {L} tokens, batch {B}, "
          f"device {device}, median of {args.repeats}\n")
    print("| measurement | fp32 tok/s | bf16 tok/s | peak memory MB |")
    print("|---|---|---|---|")

    if not args.skip_training:
        codes = torch.randint(0, prior.config.vocab_sizes[0], (B, *prior.code_shape), device=device)
        labels = torch.randint(0, max(prior.config.num_classes, 1), (B,), device=device)
        prior.train()
        results = []
        for dtype in (None, torch.bfloat16):
            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    _, loss = prior(codes, labels)
                loss.backward()
                prior.zero_grad(set_to_none=True)
            results.append(B * L / median_seconds(step, args.repeats, sync))
        print(f"| training fwd+bwd, {B} x {L} tokens | {results[0]:.0f} | {results[1]:.0f} | "
              f"{peak_memory_mb(device):.0f} |", flush=True)

    prior.eval()
    labels = torch.arange(B, device=device) % max(prior.config.num_classes, 1)
    for scale in (1.0, 4.0):
        results = []
        for dtype in (None, torch.bfloat16):
            def sample():
                generate(prior, labels=labels, cfg_scale=scale, top_k=args.top_k, seed=0, weights_dtype=dtype)
            results.append(B * L / median_seconds(sample, args.repeats, sync))
        print(f"| KV-cached sampling, guidance {scale:g}, top-k {args.top_k} | {results[0]:.1f} | {results[1]:.1f} | "
              f"{peak_memory_mb(device):.0f} |", flush=True)


if __name__ == "__main__":
    main()
