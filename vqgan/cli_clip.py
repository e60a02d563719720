"""`vqgan clip-guide`: VQGAN+CLIP, an image for a text prompt by optimising the tokenizer's latent.

Writes OUT/final.png, OUT/progress.png (a frame every --every steps, then the final image) and
OUT/clip_guide.json (options, seed, CLIP loss per step).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from common import ConfigError
from vqgan.cli import _device


def _cmd_clip_guide(args: argparse.Namespace) -> int:
    import torch
    from torchvision.utils import make_grid, save_image

    from common import atomic_write_json
    from stage1_tokenizer import VQGAN
    from stage1_tokenizer.clip_guide import ClipGuideConfig, ClipLoadError, check_quantizer, clip_guide, load_clip

    if not args.prompt.strip():
        raise ConfigError("--prompt: must not be empty")
    pretrained = None if args.clip_pretrained.lower() in ("", "none") else args.clip_pretrained
    try:
        config = ClipGuideConfig(prompt=args.prompt, steps=args.steps, lr=args.lr, cutouts=args.cutouts,
                                 seed=args.seed, every=args.every, clip_model=args.clip_model,
                                 clip_pretrained=pretrained,
                                 clip_weights=str(args.clip_weights) if args.clip_weights else None)
    except ValueError as e:
        raise ConfigError(f"--{str(e).split()[0]}: {e}") from None
    device = _device(args.device)
    tokenizer = VQGAN.from_pretrained(args.tokenizer, device=device)
    try:
        check_quantizer(tokenizer)
    except ValueError as e:
        raise ConfigError(f"--tokenizer {args.tokenizer}: {e}") from None
    init = None
    if args.init is not None:
        from vqgan.cli_edit import _load_images
        init = _load_images([args.init], tokenizer.config.resolution, "--init")
    try:
        clip_model, stats, tokenize = load_clip(config.clip_model, config.clip_pretrained, config.clip_weights,
                                                device=device)
    except ClipLoadError as e:
        raise ConfigError(f"--clip-model/--clip-pretrained/--clip-weights: {e}") from None
    if config.clip_weights is None and config.clip_pretrained is None:
        print(f"note: CLIP {config.clip_model} has random weights (no --clip-pretrained tag or --clip-weights)")
    result = clip_guide(tokenizer, clip_model, stats, tokenize([config.prompt]), config, init=init)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image((result["image"][0] + 1) / 2, out / "final.png")
    frames = result["frames"]
    save_image(make_grid((frames + 1) / 2, nrow=min(len(frames), 8), padding=2, pad_value=1.0), out / "progress.png")
    atomic_write_json(out / "clip_guide.json", {
        "options": asdict(config), "tokenizer": str(args.tokenizer), "tokenizer_hash": tokenizer.content_hash(),
        "init": str(args.init) if args.init else None, "seed": config.seed, "device": str(device),
        "torch": torch.__version__, "losses": result["losses"], "frame_steps": result["frame_steps"]})
    losses = result["losses"]
    print(f"CLIP loss {losses[0]:.4f} -> {losses[-1]:.4f} over {config.steps} steps; "
          f"written {out / 'final.png'}, {out / 'progress.png'}, {out / 'clip_guide.json'}")
    return 0


def add_clip_guide_parser(sub: argparse._SubParsersAction) -> None:
    defaults = {"steps": 100, "lr": 0.1, "cutouts": 16, "every": 10}
    p = sub.add_parser(
        "clip-guide", help="VQGAN+CLIP: an image for a text prompt by optimising the tokenizer's latent",
        description="Optimise the tokenizer's pre-quantization latent (straight-through quantized every step) so "
                    "that CLIP's embeddings of random augmented crops of the decoded image match the prompt. "
                    "CLIP comes from open-clip-torch; pretrained weights download on first use (to the Hugging "
                    "Face cache). Offline, pass a downloaded checkpoint with --clip-weights. "
                    "Writes OUT/final.png, OUT/progress.png and OUT/clip_guide.json.",
        epilog="example: vqgan clip-guide --tokenizer tokenizers/taming-f16 --prompt 'a watercolor lighthouse' "
               "--steps 300 --out clip/lighthouse",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory (VQGAN.from_pretrained)")
    p.add_argument("--prompt", required=True, help="the text the image should match")
    p.add_argument("--init", default=None, help="start from this image (resized and centre-cropped to the "
                                                "tokenizer's resolution) instead of random codes")
    p.add_argument("--steps", type=int, default=defaults["steps"], help="optimisation steps")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="Adam step size for the latent")
    p.add_argument("--cutouts", type=int, default=defaults["cutouts"], help="random crops per step")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial codes and the crops")
    p.add_argument("--every", type=int, default=defaults["every"], help="a progress frame every this many steps")
    p.add_argument("--clip-model", default="ViT-B-32",
                   help="open_clip model name (e.g. ViT-B-32, RN50), or a JSON file with an open_clip model "
                        "config (embed_dim, vision_cfg, text_cfg) for a custom model")
    p.add_argument("--clip-pretrained", default="openai",
                   help="open_clip pretrained tag for a named model (e.g. openai, laion2b_s34b_b79k); 'none' "
                        "for random weights")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="a local CLIP checkpoint file to load instead of downloading the tag's weights")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.set_defaults(func=_cmd_clip_guide)
