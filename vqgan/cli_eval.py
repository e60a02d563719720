"""`vqgan evaluate samples|tokenizer`: the metrics of `eval/` from the command line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ConfigError, atomic_write_json
from vqgan.cli import add_decoding_options

METRICS = ("fid", "kid", "prc", "isc")


def _metric_flags(text: str) -> dict[str, bool]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METRICS))
    if unknown or not chosen:
        raise ConfigError(f"--metrics {text!r}: expected a comma-separated subset of {','.join(METRICS)}")
    return {m: m in chosen for m in METRICS}


def _cmd_evaluate_samples(args: argparse.Namespace) -> int:
    from eval.fidelity import SampleSource, as_fidelity_input, compute_metrics

    if (args.samples is None) == (args.prior is None):
        raise ConfigError("give either --samples DIR|SPEC (images to score) or --prior and --tokenizer (sample them)")
    resolution = args.resolution
    if args.prior is not None:
        from stage2_prior.images import load_pair

        if args.tokenizer is None:
            raise ConfigError("--prior needs --tokenizer (the tokenizer it was trained with)")
        prior, tokenizer = load_pair(args.prior, args.tokenizer, device=args.device or "cpu")
        resolution = resolution or tokenizer.config.resolution
        try:
            generated = SampleSource(prior, tokenizer, args.num_samples, batch_size=args.batch_size,
                                     cfg_scale=args.cfg if prior.config.num_classes else 1.0,
                                     top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
                                     steps=args.steps, choice_temperature=args.choice_temperature)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    else:
        generated = args.samples
    try:
        reference = as_fidelity_input(args.reference, resolution=resolution, split=args.split,
                                      limit=args.reference_count)
        generated = as_fidelity_input(generated, resolution=resolution, split=args.split) \
            if isinstance(generated, str) else generated
        results = compute_metrics(generated, reference, **_metric_flags(args.metrics),
                                  inception_weights=args.inception_weights, cache_dir=args.cache_dir,
                                  batch_size=args.batch_size, device=args.device or "cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    results.update(reference=args.reference, split=args.split, reference_count=len(reference))
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)
    return 0


def _cmd_evaluate_tokenizer(args: argparse.Namespace) -> int:
    from eval.fidelity import compute_metrics
    from eval.tokenizer_eval import evaluate_tokenizer
    from stage1_tokenizer import VQGAN

    tokenizer = VQGAN.from_pretrained(args.tokenizer, device=args.device or "cpu")
    results = evaluate_tokenizer(tokenizer, args.data, args.out, split=args.split, limit=args.count,
                                 batch_size=args.batch_size, device=args.device or "cpu",
                                 lpips_weights=args.lpips_weights)
    if not args.no_fid:
        cache_name = None
        if args.cache_dir:  # the held-out originals are the same for every tokenizer evaluated on them
            from eval.fidelity import reference_cache_name
            count = sum(1 for _ in Path(results["real_dir"]).iterdir())
            cache_name = "originals-" + reference_cache_name(args.data, args.split, tokenizer.config.resolution,
                                                             count, args.inception_weights)
        rfid = compute_metrics(results["recon_dir"], results["real_dir"], fid=True, kid=False, prc=False,
                               inception_weights=args.inception_weights, batch_size=args.batch_size,
                               device=args.device or "cpu", cache_dir=args.cache_dir,
                               input2_cache_name=cache_name)
        results["rfid"] = rfid["fid"]
    atomic_write_json(Path(args.out) / "metrics.json", results)
    print(json.dumps(results, indent=2))
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="FID/KID/PR/IS of samples; PSNR/SSIM/LPIPS/rFID/usage of a tokenizer")
    ev = p.add_subparsers(dest="evaluate_command", required=True, metavar="WHAT")

    p = ev.add_parser("samples", help="FID, KID, precision/recall and IS of generated images (torch-fidelity)",
                      description="Score generated images against real ones with torch-fidelity. The generated "
                                  "images are a folder of PNGs (--samples) or are sampled from a prior in batches "
                                  "(--prior/--tokenizer); the reference is a folder or a data spec. Reference "
                                  "features are cached with --cache-dir.",
                      epilog="examples:\n  vqgan evaluate samples --samples runs/demo/samples --reference "
                             "synthetic:shapes --resolution 32\n  vqgan evaluate samples --prior P --tokenizer T "
                             "--num-samples 5000 --cfg 2 --reference npz:cifar10/test.npz",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=None, help="folder of generated PNG/JPG images (or a data spec)")
    p.add_argument("--prior", type=Path, default=None, help="sample from this prior instead of reading --samples")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_decoding_options(p)
    p.add_argument("--reference", required=True, help="folder of real images or a data spec, e.g. synthetic:shapes")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split of a data spec")
    p.add_argument("--reference-count", type=int, default=None, help="use the first N reference images")
    p.add_argument("--resolution", type=int, default=None, help="size to build data specs at (default: tokenizer's)")
    p.add_argument("--metrics", default="fid,kid,prc,isc", help="subset of fid,kid,prc,isc")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity Inception weights file (default: $VQGAN_INCEPTION_WEIGHTS, else download)")
    p.add_argument("--cache-dir", default=None, help="cache reference features here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_evaluate_samples)

    p = ev.add_parser("tokenizer", help="PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity on held-out images",
                      description="Reconstruct held-out images; write OUT/recon, OUT/real, OUT/grid.png and "
                                  "OUT/metrics.json. LPIPS needs the VGG16 backbone (download or $VQGAN_LPIPS_VGG); "
                                  "rFID needs the Inception weights (download or $VQGAN_INCEPTION_WEIGHTS).",
                      epilog="example: vqgan evaluate tokenizer --tokenizer runs/demo/stage1/tokenizer "
                             "--data synthetic:shapes --out runs/demo/eval-tok")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--data", required=True, help="data spec of the held-out images")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--count", type=int, default=1000, help="number of held-out images")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lpips-weights", default=None, help="VGG16 backbone file (default: $VQGAN_LPIPS_VGG, else download)")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception pass)")
    p.add_argument("--cache-dir", default=None, help="cache the originals' Inception features here (for rFID)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_evaluate_tokenizer)
