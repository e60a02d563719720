"""VQGAN+CLIP: optimise a tokenizer's latent so that CLIP sees the text prompt in the decoded image.

The method of Crowson's VQGAN+CLIP notebook (Crowson et al. 2022, "VQGAN-CLIP"): the
pre-quantization latent z is the only parameter (Adam); every step it is quantized with a
straight-through estimator, decoded, cut into random crops ("cutouts") that are augmented, and the
squared spherical distance between their normalised CLIP image embeddings and the normalised
text embedding is minimised. The tokenizer and CLIP stay frozen: their weights, buffers, modes and
`requires_grad` flags are the same afterwards. Everything random draws from one CPU generator
seeded by `ClipGuideConfig.seed`, so a run on CPU is repeatable bit for bit.

CLIP comes from `open-clip-torch` (`load_clip`); its pretrained weights download at run time and a
missing file offline raises `ClipWeightsUnavailable` saying how to supply it.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# quantizers whose quantized latents approximate z, so z + (z_q - z).detach() is a straight-through path;
# vqvae2's decoder input merges two levels computed from z by learned convs, which z cannot follow that way
STRAIGHT_THROUGH_QUANTIZERS = ("vq", "rvq", "fsq", "lfq")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipGuideConfig:
    prompt: str = ""
    steps: int = 100
    lr: float = 0.1                   # the notebook's step size for z
    cutouts: int = 16                 # random crops per step, each resized to CLIP's image size
    cut_pow: float = 1.0              # crop side = min + rand ** cut_pow * (max - min): > 1 favours small crops
    min_cut: float = 0.5              # smallest crop side, as a fraction of the image side
    flip: bool = True                 # random horizontal flips of the crops
    rotate: float = 10.0              # degrees, +-: random affine per crop
    translate: float = 0.05           # fraction of the crop side, +-
    scale: float = 0.05               # +- around 1
    jitter: float = 0.05              # brightness / contrast / saturation jitter, +- this fraction
    noise: float = 0.0                # std of Gaussian noise added to the crops (in [0, 1] pixel units)
    seed: int = 0
    every: int = 10                   # keep a progression frame every this many steps
    clip_model: str = "ViT-B-32"      # an open_clip model name, or a JSON file with an open_clip model config
    clip_pretrained: str | None = "openai"
    clip_weights: str | None = None   # a local weights file instead of the download

    def __post_init__(self) -> None:
        for name in ("steps", "cutouts", "every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.min_cut <= 1:
            raise ValueError(f"min_cut must be in (0, 1], got {self.min_cut}")


@dataclass
class PreprocessStats:
    """What CLIP expects of an image: its side in pixels and the per-channel mean and std in [0, 1] units."""
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


class ClipLoadError(ValueError):
    """A CLIP model name, config file, tag or weights file that cannot be used."""


class ClipWeightsUnavailable(ClipLoadError):
    """The pretrained CLIP weights are not in the local cache and cannot be downloaded."""


# ---- CLIP -----------------------------------------------------------------------------------------
def _stats_of(model: nn.Module) -> PreprocessStats:
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return PreprocessStats(image_size=int(size), mean=tuple(cfg.get("mean", OPENAI_MEAN)),
                           std=tuple(cfg.get("std", OPENAI_STD)))


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ClipLoadError("CLIP guidance needs open-clip-torch, which is not installed: "
                            "pip install -e '.[clip]' (or pip install open-clip-torch)") from None
    return open_clip


def _clip_from_config_file(path: Path) -> tuple[nn.Module, Callable]:
    open_clip = _open_clip()

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ClipLoadError(f"CLIP config {path}: not a readable JSON file ({e})") from None
    cfg = cfg.get("model_cfg", cfg)  # an open_clip_config.json nests it under model_cfg
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ClipLoadError(f"CLIP config {path}: missing {', '.join(sorted(missing))} (open_clip's model config "
                            f"format, e.g. open_clip.get_model_config('ViT-B-32'))")
    if cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] or "timm_model_name" in cfg["vision_cfg"]:
        raise ClipLoadError(f"CLIP config {path}: only open_clip's own ViT/ResNet + transformer CLIP is supported "
                            f"from a config file (no custom_text, hf_model_name or timm_model_name)")
    try:
        model = open_clip.CLIP(**cfg)
    except TypeError as e:
        raise ClipLoadError(f"CLIP config {path}: {e}") from None
    context_length = cfg["text_cfg"].get("context_length", 77)
    return model, open_clip.SimpleTokenizer(context_length=context_length)


def load_clip(name: str, pretrained: str | None, weights_path: str | Path | None = None,
              cache_dir: str | None = None, device: str | torch.device = "cpu"
              ) -> tuple[nn.Module, PreprocessStats, Callable[[list[str]], torch.Tensor]]:
    """An eval-mode open_clip model, its preprocessing stats and its text tokenizer (texts -> (N, L) int).

    `name` is an open_clip model name or a JSON file with an open_clip model config. Weights come from
    `weights_path` if given, else the `pretrained` tag (downloaded or from the Hugging Face cache), else
    they are random (seeded with 0, for tests).
    """
    open_clip = _open_clip()

    weights = Path(weights_path) if weights_path is not None else None
    if weights is not None and not weights.is_file():
        raise ClipLoadError(f"CLIP weights file {weights} does not exist")
    config_file = Path(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random CLIP weights are the same every time
        if name.endswith(".json") or config_file.is_file():
            if not config_file.is_file():
                raise ClipLoadError(f"CLIP config file {config_file} does not exist")
            if pretrained and weights is None:
                raise ClipLoadError(f"CLIP pretrained tag {pretrained!r} names weights of a built-in model; with a "
                                    f"config file ({config_file}) give a weights file instead, or no tag")
            model, tokenize = _clip_from_config_file(config_file)
            if weights is not None:
                try:
                    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
                except (RuntimeError, KeyError, OSError, ValueError) as e:
                    raise ClipLoadError(f"CLIP weights {weights} do not fit {config_file}: {e}") from None
        else:
            if name not in open_clip.list_models():
                raise ClipLoadError(f"unknown CLIP model {name!r}: give an open_clip model name (open_clip."
                                    f"list_models(), e.g. ViT-B-32, RN50) or a JSON model config file")
            if weights is not None:
                source = str(weights)
            elif pretrained:
                tags = open_clip.list_pretrained_tags_by_model(name)
                if pretrained not in tags:
                    raise ClipLoadError(f"CLIP model {name!r} has no pretrained tag {pretrained!r}; known tags: "
                                        f"{', '.join(tags) or 'none'}")
                source = pretrained
            else:
                source = None
            try:
                model = open_clip.create_model(name, pretrained=source, cache_dir=cache_dir, device=device)
            except RuntimeError as e:
                if weights is not None:
                    raise ClipLoadError(f"CLIP weights {weights} do not fit model {name!r}: {e}") from None
                raise ClipWeightsUnavailable(
                    f"the pretrained weights of CLIP model {name!r}, tag {pretrained!r}, are not available offline "
                    f"({e}). Supply them by running once with network access (they are cached in the Hugging Face "
                    f"cache; set HF_HOME or HF_HUB_CACHE to a folder that already holds them), or download the "
                    f"checkpoint and pass it with --clip-weights FILE (load_clip(weights_path=...))") from None
            try:
                tokenize = open_clip.get_tokenizer(name, cache_dir=cache_dir)
            except Exception as e:  # HF tokenizers fetch their vocabulary from the Hub
                raise ClipWeightsUnavailable(f"the text tokenizer of CLIP model {name!r} is not available "
                                             f"offline ({e}); choose a model with open_clip's built-in tokenizer "
                                             f"or set HF_HOME to a cache that holds it") from None
    model = model.to(device).eval().requires_grad_(False)
    return model, _stats_of(model), tokenize


# ---- the optimisation -----------------------------------------------------------------------------
@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the modules' parameters; their modes and flags are restored after."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def check_quantizer(tokenizer: nn.Module) -> None:
    """Raise ValueError when the tokenizer's quantizer has no straight-through path from codes to z."""
    kind = tokenizer.config.quantizer.type
    if kind not in STRAIGHT_THROUGH_QUANTIZERS:
        raise ValueError(f"clip-guide needs a quantizer whose quantized latents approximate the encoder's latents "
                         f"({', '.join(STRAIGHT_THROUGH_QUANTIZERS)}); this tokenizer's is {kind!r}, whose decoder "
                         f"input merges two levels, so a straight-through estimator has no meaning for it")


def quantize_straight_through(quantizer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """z (B, C, h, w) -> nearest codes' latents in the forward pass, identity gradient to z in the backward.

    Uses the quantizer's public `encode` / `codes_to_latents`, which update no codebook or usage state."""
    with torch.no_grad():
        z_q = quantizer.codes_to_latents(quantizer.encode(z)).to(z.dtype)
    return z + (z_q - z).detach()


def random_latents(tokenizer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """Latents (1, C, h, w) of uniformly random codes at the tokenizer's resolution."""
    h, w = tokenizer.code_grid(tokenizer.config.resolution)
    sizes = tokenizer.vocab_sizes
    levels = [torch.randint(0, K, (1, h, w), generator=generator) for K in sizes]
    codes = levels[0] if tokenizer.code_depth == 1 else torch.stack(levels, dim=-1)  # (1, h, w[, D])
    device = next(tokenizer.parameters()).device
    with torch.no_grad():
        return tokenizer.quantize.codes_to_latents(codes.to(device)).float()


def clamp_straight_through(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward (the notebook's ClampWithGrad, simplified)."""
    return x + (x.clamp(low, high) - x).detach()


def make_cutouts(pixels: torch.Tensor, count: int, cut_size: int, config: ClipGuideConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """pixels (1, 3, H, W) in [0, 1] -> (count, 3, cut_size, cut_size) random augmented crops.

    Random square crops (side between min_cut and 1 of the image), resized, then per crop a random flip,
    a small affine (rotation, scale, shift), colour jitter and noise; all randomness from `generator`."""
    _, _, H, W = pixels.shape
    side_max = min(H, W)
    side_min = max(1, min(side_max, round(config.min_cut * side_max)))
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731  (CPU draws: same on every device)
    cuts = []
    for _ in range(count):
        side = int(rand(()).pow(config.cut_pow) * (side_max - side_min + 1)) + side_min
        side = min(side, side_max)
        y = int(rand(()) * (H - side + 1))
        x = int(rand(()) * (W - side + 1))
        crop = pixels[:, :, y:y + side, x:x + side]
        cuts.append(F.interpolate(crop, size=(cut_size, cut_size), mode="bilinear", align_corners=False))
    cuts = torch.cat(cuts)  # (N, 3, S, S)
    N, device = count, pixels.device

    angle = (rand(N) * 2 - 1) * math.radians(config.rotate)
    scale = 1 + (rand(N) * 2 - 1) * config.scale
    shift = (rand(N, 2) * 2 - 1) * config.translate * 2  # affine_grid's coordinates span 2 per side
    flip = torch.where(rand(N) < 0.5, -1.0, 1.0) if config.flip else torch.ones(N)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], -1),
                         torch.stack([sin * flip, cos, shift[:, 1]], -1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(device, cuts.dtype), list(cuts.shape), align_corners=False)
    cuts = F.grid_sample(cuts, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    jitter = ((rand(N, 3) * 2 - 1) * config.jitter + 1).to(device, cuts.dtype)  # brightness, contrast, saturation
    mean = cuts.mean(dim=(1, 2, 3), keepdim=True)
    cuts = (cuts - mean) * jitter[:, 1, None, None, None] + mean
    gray = cuts.mean(dim=1, keepdim=True)
    cuts = (cuts - gray) * jitter[:, 2, None, None, None] + gray
    cuts = cuts * jitter[:, 0, None, None, None]
    if config.noise > 0:
        cuts = cuts + config.noise * torch.randn(cuts.shape, generator=generator).to(device, cuts.dtype)
    return clamp_straight_through(cuts, 0.0, 1.0)


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between unit vectors (..., E): the notebook's `spherical_dist_loss`."""
    return (a - b).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def clip_guide(tokenizer: nn.Module, clip_model: nn.Module, preprocess_stats: PreprocessStats,
               text_tokens: torch.Tensor, config: ClipGuideConfig, init: torch.Tensor | None = None,
               progress: bool = True) -> dict:
    """Optimise a latent so its decoded image matches the text under CLIP.

    text_tokens (1, L) from the CLIP tokenizer; init (1, 3, R, R) in [-1, 1] or None for random codes.
    Returns {"image": (1, 3, R, R) in [-1, 1], "losses": [loss per step], "frames": (F, 3, R, R),
    "frame_steps": [step of each frame]}; loss i is measured before the i-th update, the last frame is
    the final image."""
    check_quantizer(tokenizer)
    device = next(tokenizer.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    mean = torch.tensor(preprocess_stats.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_stats.std, device=device).view(1, 3, 1, 1)
    R = tokenizer.config.resolution
    losses, frames, frame_steps = [], [], []
    with frozen(tokenizer, clip_model):
        with torch.no_grad():
            text_embed = F.normalize(clip_model.encode_text(text_tokens.to(device)).float(), dim=-1)  # (1, E)
            if init is not None:
                if init.shape != (1, 3, R, R):
                    raise ValueError(f"init image must have shape (1, 3, {R}, {R}), got {tuple(init.shape)}")
                z0 = tokenizer.encode_latents(init.to(device)).float()
            else:
                z0 = random_latents(tokenizer, generator)
        z = z0.clone().requires_grad_(True)  # (1, C, h, w): the only parameter
        optimizer = torch.optim.Adam([z], lr=config.lr)

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return tokenizer.decode_latents(quantize_straight_through(tokenizer.quantize, latents))

        for step in range(config.steps):
            image = decode(z)  # (1, 3, R, R), unclamped
            if step % config.every == 0:
                frames.append(image.detach().clamp(-1, 1).cpu())
                frame_steps.append(step)
            pixels = clamp_straight_through((image + 1) / 2, 0.0, 1.0)
            cuts = make_cutouts(pixels, config.cutouts, preprocess_stats.image_size, config, generator)
            image_embed = F.normalize(clip_model.encode_image((cuts - mean) / std).float(), dim=-1)  # (N, E)
            loss = spherical_distance(image_embed, text_embed).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and (step % config.every == 0 or step == config.steps - 1):
                print(f"clip-guide step {step + 1}/{config.steps}: loss {losses[-1]:.4f}", flush=True)
        with torch.no_grad():
            final = decode(z).clamp(-1, 1).cpu()
    frames.append(final)
    frame_steps.append(config.steps)
    return {"image": final, "losses": losses, "frames": torch.cat(frames), "frame_steps": frame_steps}
