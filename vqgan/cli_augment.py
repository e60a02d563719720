"""`vqgan augment`: class-labelled synthetic training data from a prior + tokenizer."""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ConfigError
from vqgan.cli import _add_sampling_options, _decoding, _device, _int_list, _weights_dtype

DEFAULT_GUIDANCE = 2.0


def _cmd_augment(args: argparse.Namespace) -> int:
    from common import sha256_file
    from stage2_prior.augment import augment, wds_spec
    from stage2_prior.images import load_pair
    from stage2_prior.model import WEIGHTS_NAME

    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=_device(args.device))
    try:
        result = augment(prior, tokenizer, args.out, per_class=args.per_class, classes=_int_list(args.classes),
                         cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, batch_size=args.batch_size, output_format=args.format,
                         weights_dtype=_weights_dtype(args), **_decoding(args), prior_hash=sha256_file(args.prior / WEIGHTS_NAME))
    except ValueError as e:  # options that do not fit this prior, or an --out holding another run
        raise ConfigError(str(e)) from e
    manifest = result["manifest"]
    where = wds_spec(args.out, manifest) if args.format == "wds" else f"folder:{args.out}"
    print(f"{result['written']} images written, {result['skipped']} skipped as already done; "
          f"{manifest['count']} images of {len(manifest['options']['classes'])} classes read as {where} "
          f"(manifest {Path(args.out) / 'augment.json'})")
    return 0


def add_augment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment", help="generate class-labelled training images (folder or webdataset shards)",
                       description="Sample --per-class images of each class from a class-conditional prior, decode "
                                   "them and write an image folder (OUT/<class>/..., OUT/classes.json) or webdataset "
                                   "shards (--format wds), plus OUT/augment.json recording the options, the model "
                                   "hashes and every image's seed and sha256. Deterministic for a --seed; rerunning "
                                   "after an interruption finishes the set.",
                       epilog="example: vqgan augment --prior runs/tiny/stage2/prior --tokenizer "
                              "runs/tiny/stage1/tokenizer --per-class 500 --classes 0,3,7 --out synthetic/\n"
                              "then train on it with the data spec folder:synthetic/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sampling_options(p)
    p.set_defaults(cfg=DEFAULT_GUIDANCE)
    for action in p._actions:
        if action.dest == "cfg":
            action.help = f"classifier-free guidance scale (1 = off; default {DEFAULT_GUIDANCE} here, unlike sample)"
        elif action.dest == "out":
            action.help = "output directory; rerun with the same settings to resume"
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--classes", default=None, help="comma-separated class ids, e.g. 0,3,7 (default: every class)")
    p.add_argument("--format", default="folder", choices=["folder", "wds"],
                   help="folder: OUT/<class>/<class>_000000.png; wds: one tar shard per batch")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images sampled at once; also the chunk size the seeds are tied to (default 64)")
    p.set_defaults(func=_cmd_augment)
