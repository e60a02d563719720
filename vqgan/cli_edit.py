"""`vqgan edit inpaint|transfer|mix|interpolate|extend`: editing in code space from the command line.

Each command encodes its input images with the tokenizer (resized and centre-cropped to its
resolution), edits the codes with the prior (`stage2_prior.edit`), decodes, and writes PNGs, a
side-by-side grid.png (input, mask, results) and edit.json to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import ConfigError
from vqgan.cli import _add_sampling_options, _decoding, _device, _weights_dtype


def _load_images(paths: list[str], resolution: int, option: str):
    import torch

    from data import load_image, to_tensor

    tensors = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{option}: {path} does not exist")
        try:
            tensors.append(to_tensor(load_image(path), resolution))
        except OSError as e:
            raise ConfigError(f"{option}: {path} is not a readable image ({e})") from None
    return torch.stack(tensors)


def _mask(args: argparse.Namespace, tokenizer, required: bool, what: str):
    """--mask PNG or --box x0,y0,x1,y1 (pixels at the tokenizer's resolution) -> (h, w) bool, or None."""
    from stage2_prior.edit_images import box_pixel_mask, grid_mask, png_pixel_mask

    if args.mask and args.box:
        raise ConfigError("give --mask or --box, not both")
    if not (args.mask or args.box):
        if required:
            raise ConfigError(f"give --mask PNG or --box x0,y0,x1,y1: the {what}")
        return None
    R = tokenizer.config.resolution
    if args.box:
        try:
            box = [int(v) for v in args.box.split(",")]
        except ValueError:
            raise ConfigError(f"--box {args.box!r}: expected four pixel coordinates x0,y0,x1,y1") from None
        try:
            pixels = box_pixel_mask(box, (R, R))
        except ValueError as e:
            raise ConfigError(f"--box: {e}") from None
    else:
        try:
            pixels = png_pixel_mask(args.mask, (R, R))
        except ValueError as e:
            raise ConfigError(f"--mask: {e}") from None
    mask = grid_mask(pixels, tokenizer.code_factor)
    if not mask.any():
        raise ConfigError(f"--{'box' if args.box else 'mask'}: selects no code position (the {what} is empty)")
    if mask.all():
        raise ConfigError(f"--{'box' if args.box else 'mask'}: covers every code position, so nothing is kept; "
                          f"use `vqgan sample` to generate from scratch")
    return mask


def _options(args: argparse.Namespace) -> dict:
    return dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, weights_dtype=_weights_dtype(args), **_decoding(args))


def _labels(args: argparse.Namespace, count: int):
    import torch
    return None if args.label is None else torch.full((count,), args.label, dtype=torch.long)


def _cmd_edit(args: argparse.Namespace) -> int:
    from stage2_prior import edit_images as E
    from stage2_prior.images import load_pair

    if args.edit_command == "interpolate":
        from stage1_tokenizer import VQGAN
        tokenizer = VQGAN.from_pretrained(args.tokenizer, device=_device(args.device))
        a, b = _load_images([args.image_a, args.image_b], tokenizer.config.resolution, "--image-a/--image-b")
        try:
            E.interpolate_images(tokenizer, a, b, args.out, steps=args.steps, order=args.order, seed=args.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        print(f"{args.steps} frames from a to b in {args.out} (grid: {Path(args.out) / 'grid.png'})")
        return 0

    prior, tokenizer = load_pair(args.prior, args.tokenizer, device=_device(args.device))
    R = tokenizer.config.resolution
    try:
        if args.edit_command == "inpaint":
            images = _load_images(args.images, R, "--images")
            mask = _mask(args, tokenizer, True, "region to regenerate")
            record = E.inpaint_images(prior, tokenizer, images, mask, args.out, samples=args.samples,
                                      labels=_labels(args, len(images)), seam_rounds=args.seam_rounds,
                                      **_options(args))
            summary = f"inpainted {record['masked_positions']} code positions of {record['images']} image(s)"
        elif args.edit_command == "transfer":
            images = _load_images(args.images, R, "--images")
            try:
                fractions = [float(v) for v in args.resample.split(",")]
            except ValueError:
                raise ConfigError(f"--resample {args.resample!r}: expected fractions like 0.5 or 0.25,0.5,0.75") from None
            record = E.transfer_images(prior, tokenizer, images, args.to_class, args.out,
                                       resample_fractions=fractions, mask=_mask(args, tokenizer, False, "region"),
                                       order=args.order, samples=args.samples, **_options(args))
            summary = f"moved {record['images']} image(s) to class {args.to_class}"
        elif args.edit_command == "mix":
            a, b = _load_images([args.image_a, args.image_b], R, "--image-a/--image-b")
            region = _mask(args, tokenizer, True, "region taken from --image-b")
            record = E.mix_images(prior, tokenizer, a, b, region, args.out, samples=args.samples,
                                  seam_rounds=args.seam_rounds, labels=_labels(args, 1), **_options(args))
            summary = f"mixed {record['region_positions']} code positions of b into a"
        else:  # extend
            size = (args.height or R, args.width or R)
            image = _load_images([args.image], R, "--image")[0] if args.image else None
            record = E.extend_images(prior, tokenizer, size, args.out, n=args.n,
                                     labels=_labels(args, args.n), image=image, **_options(args))
            summary = f"{record['n']} images of {size[1]}x{size[0]} px (code grid {record['code_grid']})"
    except ValueError as e:  # masks, classes and options that do not fit this prior or tokenizer
        raise ConfigError(str(e)) from e
    print(f"{summary}; written to {args.out} (grid: {Path(args.out) / 'grid.png'})")
    return 0


def _mask_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mask", default=None, help=f"PNG mask, white = {what}; the image's size after resizing to the "
                                                f"tokenizer's resolution")
    p.add_argument("--box", default=None, help=f"pixel box x0,y0,x1,y1 (x1, y1 exclusive): {what}")


def add_edit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit images in code space: inpaint, transfer, mix, interpolate, extend",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    edit_sub = p.add_subparsers(dest="edit_command", required=True, metavar="EDIT_COMMAND")

    q = edit_sub.add_parser("inpaint", help="regenerate a masked region given the rest",
                            description="Resample the masked code positions in raster order with every other code "
                                        "fixed. An autoregressive prior sees only the kept codes before a position; "
                                        "--seam-rounds resamples a band around the mask's edge afterwards. A "
                                        "masked prior sees every kept code.",
                            epilog="example: vqgan edit inpaint --prior P --tokenizer T --images a.png --box 8,8,24,24 "
                                   "--samples 4 --out inpainted/")
    _add_sampling_options(q)
    q.add_argument("--images", nargs="+", required=True)
    _mask_options(q, "regenerate")
    q.add_argument("--samples", type=int, default=4, help="results per image")
    q.add_argument("--seam-rounds", type=int, default=0, help="extra rounds resampling the band around the seam")
    q.add_argument("--label", type=int, default=None, help="class id to inpaint under (class-conditional priors)")

    q = edit_sub.add_parser("transfer", help="keep part of an image's codes, resample the rest under another class",
                            epilog="example: vqgan edit transfer --prior P --tokenizer T --images a.png --to-class 3 "
                                   "--resample 0.25,0.5,0.75 --out transfer/")
    _add_sampling_options(q)
    q.set_defaults(cfg=3.0)
    q.add_argument("--images", nargs="+", required=True)
    q.add_argument("--to-class", type=int, required=True, help="target class id")
    q.add_argument("--resample", default="0.5", help="fraction(s) of code positions to resample, comma-separated")
    q.add_argument("--order", choices=["raster", "random", "center"], default="raster",
                   help="raster: resample the last positions (keep the top); random: a seeded random subset; "
                        "center: the positions nearest the centre (keep the surroundings)")
    _mask_options(q, "the region to resample (instead of --resample)")
    q.add_argument("--samples", type=int, default=1, help="results per image and fraction")

    q = edit_sub.add_parser("mix", help="paste a region of image b's codes into image a, harmonise the seam",
                            epilog="example: vqgan edit mix --prior P --tokenizer T --image-a a.png --image-b b.png "
                                   "--box 16,0,32,32 --out mixed/")
    _add_sampling_options(q)
    q.add_argument("--image-a", required=True)
    q.add_argument("--image-b", required=True)
    _mask_options(q, "the region taken from --image-b")
    q.add_argument("--seam-rounds", type=int, default=1, help="rounds resampling the band around the seam (0 = splice)")
    q.add_argument("--samples", type=int, default=2, help="harmonised results")
    q.add_argument("--label", type=int, default=None, help="class id to harmonise under (class-conditional priors)")

    q = edit_sub.add_parser("interpolate", help="frames from image a to image b by swapping code positions",
                            epilog="example: vqgan edit interpolate --tokenizer T --image-a a.png --image-b b.png "
                                   "--steps 8 --out frames/")
    q.add_argument("--tokenizer", required=True, type=Path)
    q.add_argument("--image-a", required=True)
    q.add_argument("--image-b", required=True)
    q.add_argument("--steps", type=int, default=8, help="frames including both ends")
    q.add_argument("--order", choices=["raster", "random", "center"], default="raster")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--device", default=None)

    q = edit_sub.add_parser("extend", help="images larger than the training size by sliding-window sampling",
                            description="taming's sliding window: every position is sampled by a window of the "
                                        "trained size centred on it where it fits. --image keeps an image's codes "
                                        "in the top-left and extends it right / down.",
                            epilog="example: vqgan edit extend --prior P --tokenizer T --width 64 --label 2 --n 4 "
                                   "--out wide/")
    _add_sampling_options(q)
    q.add_argument("--width", type=int, default=None, help="pixels (default: the tokenizer's resolution)")
    q.add_argument("--height", type=int, default=None, help="pixels (default: the tokenizer's resolution)")
    q.add_argument("--n", type=int, default=4, help="images to generate")
    q.add_argument("--label", type=int, default=None, help="class id (class-conditional priors)")
    q.add_argument("--image", default=None, help="an image to extend (kept in the top-left)")

    p.set_defaults(func=_cmd_edit)
