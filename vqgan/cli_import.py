"""`vqgan import taming|llamagen`: a taming-transformers VQGAN or LlamaGen VQ checkpoint as this project's tokenizer."""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_import_taming(args: argparse.Namespace) -> int:
    from stage1_tokenizer.import_taming import describe, import_taming

    model = import_taming(args.checkpoint, args.config)
    model.save_pretrained(args.out)
    info = describe(model)
    print(f"imported {args.checkpoint} -> {args.out}: f{info['factor']}, {info['code_grid'][0]}x"
          f"{info['code_grid'][1]} codes at {model.config.resolution} px, codebook {info['codebook']}, "
          f"{info['parameters'] / 1e6:.2f}M parameters, content hash {model.content_hash()[:12]}")
    if args.config is None:
        print("no --config: shapes inferred from the weights; resolution recorded as "
              f"{model.config.resolution} (attention placement is what the weights fix)")
    return 0


def _cmd_import_llamagen(args: argparse.Namespace) -> int:
    from stage1_tokenizer.import_llamagen import import_llamagen
    from stage1_tokenizer.import_taming import describe

    model = import_llamagen(args.checkpoint, resolution=args.resolution,
                            codebook_l2_norm=not args.no_codebook_l2_norm)
    model.save_pretrained(args.out)
    info = describe(model)
    print(f"imported {args.checkpoint} -> {args.out}: f{info['factor']}, {info['code_grid'][0]}x"
          f"{info['code_grid'][1]} codes at {model.config.resolution} px, codebook {info['codebook']}"
          f"{' (l2-normalised)' if model.config.quantizer.l2_normalize else ''}, "
          f"{info['parameters'] / 1e6:.2f}M parameters, content hash {model.content_hash()[:12]}")
    return 0


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert another project's tokenizer checkpoint (taming, llamagen)",
                       description="Convert a tokenizer checkpoint from another code base into this project's "
                                   "save_pretrained format (config.json + model.safetensors).")
    import_sub = p.add_subparsers(dest="import_source", required=True, metavar="SOURCE")
    p = import_sub.add_parser(
        "taming", help="a taming-transformers VQModel (.ckpt or .pt)",
        description="Map a taming-transformers VQModel checkpoint (Lightning .ckpt or plain .pt state dict, "
                    "read with torch.load(weights_only=True)) and its YAML config onto this tokenizer. "
                    "Loss weights (loss.*) are dropped; Gumbel/EMA quantizers, remapped indices and any "
                    "key or option the tokenizer cannot express exactly are refused by name.",
        epilog="example: vqgan import taming logs/vqgan_imagenet_f16_16384/checkpoints/last.ckpt "
               "--config logs/vqgan_imagenet_f16_16384/configs/model.yaml --out tokenizers/taming-f16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="taming checkpoint (.ckpt with a state_dict, or .pt)")
    p.add_argument("--config", type=Path, default=None,
                   help="taming YAML config (model.target + model.params); without it the shapes are inferred "
                        "from the weights")
    p.add_argument("--out", type=Path, required=True, help="output directory for VQGAN.from_pretrained")
    p.set_defaults(func=_cmd_import_taming)

    p = import_sub.add_parser(
        "llamagen", help="a LlamaGen VQ tokenizer (FoundationVision/LlamaGen, e.g. vq_ds16_c2i.pt)",
        description="Map a LlamaGen VQModel checkpoint (tokenizer/tokenizer_image/vq_model.py; a torch save with "
                    "the weights under 'model', read with torch.load(weights_only=True)) onto this tokenizer; the "
                    "shapes are inferred from the weights. The codebook usage buffer is dropped; batch norm, conv "
                    "shortcuts, resampling without conv, differing encoder/decoder ch_mult and any key the tokenizer "
                    "cannot express exactly are refused by name.",
        epilog="example: vqgan import llamagen pretrained_models/vq_ds16_c2i.pt --out tokenizers/llamagen-vq16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="LlamaGen checkpoint (.pt with a 'model' state dict)")
    p.add_argument("--resolution", type=int, default=256,
                   help="training resolution to record (default 256); attention stays at the lowest-resolution "
                        "level whatever this is")
    p.add_argument("--no-codebook-l2-norm", action="store_true",
                   help="the checkpoint was trained with codebook_l2_norm=False (the released ones use True; the "
                        "weights do not say)")
    p.add_argument("--out", type=Path, required=True, help="output directory for VQGAN.from_pretrained")
    p.set_defaults(func=_cmd_import_llamagen)
