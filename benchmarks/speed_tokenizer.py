"""Tokenizer speed at taming's shapes, the protocol of issue 11 (compare with taming on the same CPU).

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/speed_tokenizer.py [--preset taming-f16|taming-f4] [--repeats 5] [--device cpu]

Random weights and images. Rows: encode + quantize + decode without gradients, and forward +
backward of the L1 reconstruction + codebook loss (no LPIPS, no GAN), each in fp32 and with bf16
autocast (the quantizer's distances stay fp32 inside the model). Channels-last, as training runs.
Median of `--repeats` after a warm-up; peak memory is the process's maximum RSS (CPU) or CUDA peak.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header, median_seconds, peak_memory_mb  # noqa: E402
from stage1_tokenizer import QuantizerConfig, VQGAN, VQGANConfig  # noqa: E402

# taming's ImageNet f16 config (72.1M parameters in taming) and a taming-style f4 (6.1M)
PRESETS = {
    "taming-f16": dict(config=dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                   attn_resolutions=(16,), z_channels=256,
                                   quantizer=QuantizerConfig(codebook_size=1024, code_dim=256, l2_normalize=False)),
                       infer_batch=4, train_batch=2),
    "taming-f4": dict(config=dict(resolution=32, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(),
                                  z_channels=256, quantizer=QuantizerConfig(codebook_size=1024, code_dim=256,
                                                                            l2_normalize=False)),
                      infer_batch=32, train_batch=32),
}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="taming-f16", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**preset["config"])).to(device, memory_format=torch.channels_last)
    R = model.config.resolution
    print(machine_header())
    print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {R} px, "
          f"device {device}, channels-last, median of {args.repeats}\n")
    print("| measurement | fp32 img/s | bf16 img/s | peak memory MB |")
    print("|---|---|---|---|")

    def images(batch: int) -> torch.Tensor:
        return (torch.rand(batch, 3, R, R, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)

    x = images(preset["infer_batch"])
    model.eval()
    rates = []
    for dtype in (None, torch.bfloat16):
        @torch.no_grad()
        def roundtrip():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model.decode(model.encode(x))
        rates.append(len(x) / median_seconds(roundtrip, args.repeats, sync))
    print(f"| encode + quantize + decode, batch {len(x)} | {rates[0]:.3f} | {rates[1]:.3f} | "
          f"{peak_memory_mb(device):.0f} |", flush=True)

    x = images(preset["train_batch"])
    model.train()
    rates = []
    for dtype in (None, torch.bfloat16):
        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                recon, quant = model(x)
                loss = (recon.float() - x).abs().mean() + quant.loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        rates.append(len(x) / median_seconds(step, args.repeats, sync))
    print(f"| forward + backward (L1 + codebook), batch {len(x)} | {rates[0]:.3f} | {rates[1]:.3f} | "
          f"{peak_memory_mb(device):.0f} |", flush=True)


if __name__ == "__main__":
    main()
