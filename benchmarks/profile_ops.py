"""The top operators of one sampling run or one tokenizer pass, from `torch.profiler` (docs/performance.md).

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/profile_ops.py sampling --dtype bf16 [--rows 12]
    ... python benchmarks/profile_ops.py tokenizer --dtype fp32

`sampling`: KV-cached sampling of 256 tokens at the GPT-B shape (batch 4, top-k 2000, guidance 1),
`--dtype bf16` = bf16 weight copies. `tokenizer`: encode + quantize + decode of 4 images at the
taming f16 shape, `--dtype bf16` = bf16 autocast. Random weights; one warm-up run, then one
profiled run. Prints the wall time of the profiled run (the profiler adds a few percent).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header, native_kernels_line  # noqa: E402
from benchmarks.speed_prior import PRESETS as PRIOR_PRESETS  # noqa: E402
from benchmarks.speed_tokenizer import PRESETS as TOKENIZER_PRESETS  # noqa: E402


def _label_native_kernels() -> None:
    """The native kernels are ctypes calls, invisible to the profiler: give each a named range."""
    from stage2_prior import native_kernels
    for name in ("linear", "attention", "topk"):
        def labelled(*args, _kernel=getattr(native_kernels, name), _label=f"native::{name}", **kwargs):
            with record_function(_label):
                return _kernel(*args, **kwargs)
        setattr(native_kernels, name, labelled)


def sampling_job(dtype: torch.dtype | None):
    from stage2_prior import GPTPrior, PriorConfig, generate
    _label_native_kernels()
    torch.manual_seed(0)
    prior = GPTPrior(PriorConfig(**PRIOR_PRESETS["gpt-b"])).eval()
    labels = torch.arange(4)
    return lambda: generate(prior, labels=labels, top_k=2000, seed=0, weights_dtype=dtype)


def tokenizer_job(dtype: torch.dtype | None):
    from stage1_tokenizer import VQGAN, VQGANConfig
    preset = TOKENIZER_PRESETS["taming-f16"]
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**preset["config"])).eval().to(memory_format=torch.channels_last)
    images = torch.rand(preset["infer_batch"], 3, 256, 256).mul(2).sub(1).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            model.decode(model.encode(images))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["sampling", "tokenizer"])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    job = (sampling_job if args.job == "sampling" else tokenizer_job)(dtype)
    print(machine_header())
    if args.job == "sampling":
        print(native_kernels_line())
    job()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        job()
        wall = time.perf_counter() - start
    print(f"{args.job}, {args.dtype}: {wall:.2f} s profiled wall time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
