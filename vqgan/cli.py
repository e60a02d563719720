"""`vqgan`: the one console script. Each subcommand parses, builds, and calls the library.

Examples:
    vqgan train-tokenizer --config configs/tiny.yaml train.steps=200
    vqgan train-tokenizer --config configs/tiny.yaml --resume auto
    vqgan reconstruct --tokenizer runs/tiny/tokenizer --images my_images/ --out recon/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ConfigError

EPILOG_OVERRIDES = ("Overrides are KEY=VALUE pairs on the config's dataclass fields, e.g. "
                    "train.steps=500 model.quantizer.codebook_size=512 loss.perceptual_weight=0")


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from common import load_config
    from stage1_tokenizer.train import TokenizerTrainConfig, train

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
    results = train(cfg, resume=args.resume)
    if results:
        print(f"held-out PSNR {results['psnr']:.2f} dB (mean-colour baseline {results['mean_colour_psnr']:.2f} dB), "
              f"codebook usage {100 * results['codebook_usage']:.1f}% "
              f"({results['codes_used']}/{results['codebook_size']}), tokenizer saved to "
              f"{Path(cfg.train.out_dir) / 'tokenizer'}")
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from eval.reconstruct import reconstruct_folder

    results = reconstruct_folder(args.tokenizer, args.images, args.out, resolution=args.resolution,
                                 batch_size=args.batch_size, device=args.device)
    print(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqgan", description="Two-stage image generation: VQGAN tokenizer + priors.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train the stage-1 VQGAN tokenizer",
                       description="Train the VQGAN tokenizer from a YAML preset plus overrides. Writes "
                                   "checkpoints, logs, reconstruction grids and OUT/tokenizer (safetensors).",
                       epilog="example: vqgan train-tokenizer --config configs/tiny.yaml train.steps=500\n"
                              + EPILOG_OVERRIDES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML preset, e.g. configs/tiny.yaml (defaults if omitted)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto' continues from the newest checkpoint in train.out_dir (if any); or a checkpoint dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("reconstruct", help="encode and decode a folder of images with a tokenizer",
                       description="Reconstruct every image of a folder; writes the reconstructions, a "
                                   "side-by-side grid and metrics.json (PSNR, codebook usage).",
                       epilog="example: vqgan reconstruct --tokenizer runs/tiny/tokenizer --images imgs/ --out recon/")
    p.add_argument("--tokenizer", required=True, type=Path, help="directory written by save_pretrained")
    p.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--resolution", type=int, default=None, help="resize+crop to this size (default: the tokenizer's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_reconstruct)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (naming the file or option): printed without a traceback."""
    from data import DataSourceError
    from stage1_tokenizer import TokenizerLoadError
    from stage1_tokenizer.perceptual import PerceptualWeightsMissing
    return ConfigError, DataSourceError, TokenizerLoadError, PerceptualWeightsMissing, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"vqgan {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
