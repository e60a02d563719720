"""`vqgan`: the one console script. Each subcommand parses, builds, and calls the library.

Examples:
    vqgan run --config configs/tiny.yaml --out runs/demo     # everything, resumable
    vqgan train-tokenizer --config configs/tiny.yaml train.steps=200
    vqgan train-tokenizer --config configs/tiny.yaml --resume auto
    vqgan reconstruct --tokenizer runs/tiny/stage1/tokenizer --images my_images/ --out recon/
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

    cfg = load_config(TokenizerTrainConfig, args.config, args.overrides, section="tokenizer")
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


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from data.pack import pack_dataset

    manifest = pack_dataset(args.source, args.out, shard_size=args.shard_size, resolution=args.resolution,
                            image_format=args.format, split=args.split, seed=args.seed)
    last = len(manifest["shards"]) - 1
    urls = Path(args.out) / f"shard-{{000000..{last:06d}}}.tar"
    print(f"{manifest['count']} images in {last + 1} shards under {args.out} "
          f"({manifest.get('skipped', 0)} unreadable skipped); read them with the data spec wds:{urls}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from stage1_tokenizer import VQGAN
    from stage1_tokenizer.encode import encode_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = VQGAN.from_pretrained(args.tokenizer, device=device)
    manifest = encode_dataset(tokenizer, args.data, args.out, resolution=args.resolution, split=args.split,
                              flip=args.flip, batch_size=args.batch_size, shard_size=args.shard_size,
                              device=device, num_workers=args.num_workers)
    print(f"{manifest['total']} images -> codes {manifest['code_shape']} in {len(manifest['shards'])} shards "
          f"under {args.out} (tokenizer {manifest['tokenizer_hash'][:12]})")
    return 0


def _cmd_train_prior(args: argparse.Namespace) -> int:
    from common import load_config
    from stage2_prior.train import PriorRunConfig, train

    cfg = load_config(PriorRunConfig, args.config, args.overrides, section="prior")
    train(cfg, resume=args.resume)  # the main process prints the final stats
    return 0


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--classes {text!r}: expected comma-separated class ids, e.g. 0,3,7") from None


def _cmd_sample(args: argparse.Namespace) -> int:
    from stage2_prior.images import load_pair, sample_images

    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=_device(args.device))
    try:
        record = sample_images(prior, tokenizer, args.out, classes=_int_list(args.classes), n=args.n,
                               cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                               weights_dtype=_weights_dtype(args), **_decoding(args))
    except ValueError as e:  # sampling options that do not fit this prior (class range, guidance, ...)
        raise ConfigError(str(e)) from e
    print(f"{record['n']} samples written to {args.out} (grid: {Path(args.out) / 'grid.png'})")
    return 0


def _cmd_complete(args: argparse.Namespace) -> int:
    import torch

    from data import load_image, to_tensor
    from stage2_prior.images import box_to_keep_mask, complete_images, load_pair

    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=_device(args.device))
    resolution = tokenizer.config.resolution
    paths = [Path(p) for p in args.images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--images: {path} does not exist")
    images = torch.stack([to_tensor(load_image(p), resolution) for p in paths])
    h, w = tokenizer.code_grid(resolution)
    if args.box:
        try:
            box = tuple(int(v) for v in args.box.split(","))
            assert len(box) == 4
        except (ValueError, AssertionError):
            raise ConfigError(f"--box {args.box!r}: expected four pixel coordinates x0,y0,x1,y1") from None
        keep = box_to_keep_mask(box, (resolution, resolution), (h, w))
    else:  # keep the top half, regenerate the bottom (taming's completion demo)
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[: h // 2] = True
    labels = None
    if args.label is not None:
        labels = torch.full((len(paths),), args.label, dtype=torch.long)
    try:
        record = complete_images(prior, tokenizer, images, keep, args.out, labels=labels, samples=args.samples,
                                 cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, weights_dtype=_weights_dtype(args),
                                 **_decoding(args))
    except ValueError as e:  # a box, class or guidance that does not fit this prior
        raise ConfigError(str(e)) from e
    print(f"completed {record['images']} image(s) x {record['samples_per_image']} samples, regenerating "
          f"{record['regenerated_positions']} of {h * w} code positions; grid in {Path(args.out) / 'grid.png'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from vqgan.run import load_run_config, run_pipeline

    cfg = load_run_config(args.config, args.out, args.overrides)
    result = run_pipeline(cfg, args.out, device=args.device, force=tuple(args.force or ()),
                          config_path=str(args.config))
    print(f"report: {Path(args.out) / 'report.md'} (and report.json); total "
          f"{result['total_seconds'] / 60:.1f} min of stage time")
    return 0


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior", required=True, type=Path, help="directory written by train-prior (OUT/prior)")
    p.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer the prior was trained with")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--weights", choices=["model", "bf16"], default="model",
                   help="bf16: sample with bf16 copies of the prior's weights (about 1.3-1.5x faster on CPUs "
                        "with AVX-512 bf16; tokens can differ from the model's own precision)")
    add_decoding_options(p)


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """--steps / --choice-temperature: a masked prior's decoding options (an error for autoregressive priors)."""
    p.add_argument("--steps", type=int, default=None,
                   help="masked priors: parallel decoding passes T (default 8); autoregressive priors take one "
                        "pass per code")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help="masked priors: confidence noise at the first step, annealed to 0 (default 4.5)")


def _decoding(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "choice_temperature": args.choice_temperature}


def _weights_dtype(args: argparse.Namespace):
    import torch
    return torch.bfloat16 if args.weights == "bf16" else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqgan", description="Two-stage image generation: VQGAN tokenizer + priors.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from vqgan import RUN_STAGES as STAGES
    p = sub.add_parser("run", help="the whole pipeline: tokenizer, encode, prior, sample, evaluate, report",
                       description="Train the tokenizer, encode the dataset, train the prior, sample, evaluate "
                                   "(FID/KID/precision-recall/IS, PSNR/SSIM/LPIPS/rFID, codebook usage) and write "
                                   "OUT/report.md + report.json. Finished stages are skipped on a rerun and the "
                                   "training stages resume from their last checkpoint.",
                       epilog="example: vqgan run --config configs/tiny.yaml --out runs/demo eval.num_samples=500\n"
                              "Overrides start with a section: tokenizer.*, encode.*, prior.*, eval.*",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="YAML preset with tokenizer: and prior: sections")
    p.add_argument("--out", required=True, type=Path, help="run directory (everything is written under it)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--force", action="append", choices=STAGES, metavar="STAGE",
                   help=f"redo this stage and those after it (repeatable): {', '.join(STAGES)}")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.set_defaults(func=_cmd_run)

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
                       epilog="example: vqgan reconstruct --tokenizer runs/tiny/stage1/tokenizer --images imgs/ --out recon/")
    p.add_argument("--tokenizer", required=True, type=Path, help="directory written by save_pretrained")
    p.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--resolution", type=int, default=None, help="resize+crop to this size (default: the tokenizer's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("encode", help="encode a dataset once into code shards for stage 2",
                       description="Encode every image of a data source with a tokenizer into memory-mappable "
                                   "code shards plus a manifest recording the tokenizer's content hash. "
                                   "Rerunning after an interruption continues where it stopped.",
                       epilog="example: vqgan encode --tokenizer runs/tiny/stage1/tokenizer --data synthetic:shapes "
                              "--out runs/tiny/codes --flip")
    p.add_argument("--tokenizer", required=True, type=Path, help="directory written by save_pretrained")
    p.add_argument("--data", required=True, help="data spec, e.g. synthetic:shapes, folder:PATH, wds:URLS, hf:NAME")
    p.add_argument("--out", required=True, type=Path, help="output directory for the shards")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--flip", action="store_true", help="also store the codes of the horizontally flipped images")
    p.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("train-prior", help="train a stage-2 prior (autoregressive or masked) on code shards",
                       description="Train a prior on the code shards written by `vqgan encode`: the autoregressive "
                                   "GPT (model.prior_type=ar, the default) or the masked MaskGIT-style prior "
                                   "(model.prior_type=masked). Writes checkpoints, logs, sample grids and "
                                   "OUT/prior (safetensors).",
                       epilog="example: vqgan train-prior --config configs/tiny.yaml train.steps=500\n"
                              "         vqgan train-prior --config configs/tiny.yaml model.prior_type=masked\n"
                              + EPILOG_OVERRIDES.replace("model.quantizer.codebook_size=512 loss.perceptual_weight=0",
                                                         "model.depth=4 data.conditional=false"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML preset with a 'prior:' section, e.g. configs/tiny.yaml")
    p.add_argument("--resume", metavar="auto|PATH", help="'auto' continues from the newest checkpoint in train.out_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (relative to 'prior:')")
    p.set_defaults(func=_cmd_train_prior)

    p = sub.add_parser("sample", help="sample images from a prior + tokenizer",
                       description="Sample codes (autoregressive priors: KV-cached, one code per pass; masked "
                                   "priors: --steps parallel passes) and decode them. With --classes, "
                                   "--n images per class (one grid row per class); without, --n unconditional "
                                   "images.",
                       epilog="example: vqgan sample --prior runs/tiny/stage2/prior --tokenizer runs/tiny/stage1/tokenizer "
                              "--classes 0,3,7 --n 16 --cfg 2.0 --out samples/")
    _add_sampling_options(p)
    p.add_argument("--classes", default=None, help="comma-separated class ids, e.g. 0,3,7 (default: unconditional)")
    p.add_argument("--n", type=int, default=16, help="images per class (or in total when unconditional)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("complete", help="complete images: keep some codes, sample the rest",
                       description="Encode images, keep the code positions outside a pixel box (default: keep "
                                   "the top half), sample the rest under the prior, decode. An autoregressive "
                                   "prior conditions only on kept codes that come earlier in raster order; a "
                                   "masked prior on all of them.",
                       epilog="example: vqgan complete --prior P --tokenizer T --images a.png b.png "
                              "--box 0,16,32,32 --out completed/")
    _add_sampling_options(p)
    p.add_argument("--images", nargs="+", required=True, help="image files to complete")
    p.add_argument("--box", default=None, help="pixel box x0,y0,x1,y1 to regenerate (default: the bottom half)")
    p.add_argument("--label", type=int, default=None, help="class id to complete under (class-conditional priors)")
    p.add_argument("--samples", type=int, default=4, help="completions per image")
    p.set_defaults(func=_cmd_complete)

    from vqgan.cli_eval import add_evaluate_parser
    add_evaluate_parser(sub)
    from vqgan.cli_augment import add_augment_parser
    add_augment_parser(sub)
    from vqgan.cli_edit import add_edit_parser
    add_edit_parser(sub)
    from vqgan.cli_import import add_import_parser
    add_import_parser(sub)
    from vqgan.cli_clip import add_clip_guide_parser
    add_clip_guide_parser(sub)
    from vqgan.serve.cli import add_serve_parser
    add_serve_parser(sub)

    p = sub.add_parser("data", help="data utilities (pack, collect)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("pack", help="write any data source as webdataset tar shards",
                            description="Write a data source as webdataset tar shards (image + class + JSON "
                                        "metadata) with a manifest (counts, class names, sha256 per shard). "
                                        "Rerunning after an interruption completes the set.",
                            epilog="example: vqgan data pack folder:~/photos --out shards/ --resolution 256")
    p.add_argument("source", help="data spec to read, e.g. folder:PATH, hf:NAME, synthetic:shapes")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize (shorter side) + centre-crop to this size; required for synthetic sources")
    p.add_argument("--format", default="png", choices=["png", "jpg"])
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_pack)
    from vqgan.cli_collect import add_collect_parser
    add_collect_parser(data_sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (naming the file or option): printed without a traceback."""
    from data import DataSourceError
    from data.codes import CodeShardError
    from stage1_tokenizer import TokenizerLoadError
    from stage1_tokenizer.perceptual import PerceptualWeightsMissing
    from eval.fidelity import InceptionWeightsUnavailable
    from stage2_prior import PriorLoadError
    return (ConfigError, InceptionWeightsUnavailable, DataSourceError, CodeShardError, TokenizerLoadError, PriorLoadError, PerceptualWeightsMissing,
            FileNotFoundError)


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
