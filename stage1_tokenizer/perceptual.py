"""LPIPS (Zhang et al. 2018) through the `lpips` package, with an offline-friendly VGG16 backbone.

The `lpips` wheel ships LPIPS's linear layers but downloads the ImageNet VGG16 backbone through
torchvision at run time. Here the backbone can also come from a local file (safetensors in
`vgg16().features` layout, or torchvision's full vgg16 `.pth`), so training works offline.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch

ENV_VAR = "VQGAN_LPIPS_VGG"
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 checkpoint name

# lpips splits vgg16.features at [0:4], [4:9], [9:16], [16:23], [23:30] and keeps the indices.
_SLICES = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))
_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CONV_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                  (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))
# vgg16().features tensor shapes, checked before the (slow) LPIPS construction
_VGG16_SHAPES = {
    **{f"{i}.weight": (c_out, c_in, 3, 3) for i, (c_in, c_out) in zip(_CONV_INDICES, _CONV_CHANNELS)},
    **{f"{i}.bias": (c_out,) for i, (c_in, c_out) in zip(_CONV_INDICES, _CONV_CHANNELS)},
}


class PerceptualWeightsMissing(RuntimeError):
    """The ImageNet VGG16 backbone LPIPS needs was neither found locally nor downloadable."""


_MISSING_MESSAGE = (
    "The LPIPS perceptual loss needs the ImageNet VGG16 backbone, and it could not be found or "
    "downloaded ({reason}). Supply it with loss.perceptual_weights=PATH (a .safetensors in "
    "torchvision vgg16().features layout, or torchvision's vgg16 .pth) or the "
    f"{ENV_VAR} environment variable, or put torchvision's {TORCHVISION_VGG16_FILE} in "
    "TORCH_HOME's hub/checkpoints ({cache}), or set loss.perceptual_weight=0 to train without it."
)


def _lpips_key(feature_index: int, name: str) -> str:
    """'N.weight' of vgg16().features -> 'net.sliceK.N.weight' of lpips.LPIPS."""
    for k, start, stop in _SLICES:
        if start <= feature_index < stop:
            return f"net.slice{k}.{feature_index}.{name}"
    raise KeyError(feature_index)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _features_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Normalise a full vgg16 (`features.N.*`, `classifier.*`) or a `features` state dict to `N.*`."""
    features: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if key.startswith("classifier."):
            continue  # full torchvision vgg16: LPIPS uses only the conv layers
        short = key.removeprefix("features.")
        index, _, name = short.partition(".")
        if not index.isdigit() or int(index) not in _CONV_INDICES or name not in ("weight", "bias"):
            unexpected.append(key)
            continue
        features[short] = tensor
    if unexpected:
        raise ValueError(f"{source}: unexpected keys for a VGG16 backbone: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return features


def check_vgg_backbone(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strictly validate a VGG16 state dict (`N.weight` or `features.N.weight` keys) -> `N.*` keys."""
    features = _features_state_dict(state, source)
    missing = [key for key in _VGG16_SHAPES if key not in features]
    mismatched = [f"{key}: {tuple(features[key].shape)} != {shape}"
                  for key, shape in _VGG16_SHAPES.items()
                  if key in features and tuple(features[key].shape) != shape]
    if missing or mismatched:
        raise ValueError(f"{source}: not an ImageNet VGG16 backbone: missing keys {missing}, "
                         f"shape mismatches {mismatched}")
    return features


def load_vgg_backbone(model: lpips.LPIPS, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy the 26 VGG16 conv tensors into `model.net` (slice1..slice5), strictly."""
    features = check_vgg_backbone(state, source)
    target = model.state_dict()
    with torch.no_grad():
        for key, tensor in features.items():
            index, _, name = key.partition(".")
            target[_lpips_key(int(index), name)].copy_(tensor)  # shares storage with the parameter


def _backbone_from_file(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"VGG16 backbone for LPIPS ({what}) not found: {file}")
    return _read_state_dict(file), str(file)


def resolve_backbone(weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find the VGG16 backbone: `weights`, then $VQGAN_LPIPS_VGG, then torchvision's hub cache,
    then torchvision's download. Returns (validated `N.*` state dict, where it came from)."""
    env = os.environ.get(ENV_VAR)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE
    if weights is not None:
        state, source = _backbone_from_file(weights, "loss.perceptual_weights")
    elif env:
        state, source = _backbone_from_file(env, f"${ENV_VAR}")
    elif cache.is_file():
        state, source = _read_state_dict(cache), str(cache)
    else:
        state, source = _download_backbone(cache), "torchvision download"
    return check_vgg_backbone(state, source), source


def build_lpips(weights: str | None = None, *, random_backbone: bool = False) -> lpips.LPIPS:
    """LPIPS-VGG in eval mode with every parameter frozen; inputs (B, 3, H, W) in [-1, 1].

    The backbone stays random with `random_backbone` (tests only), else comes from
    `resolve_backbone(weights)`; a missing or malformed backbone fails before the slow build.
    """
    backbone = None if random_backbone else resolve_backbone(weights)
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # linear layers from the wheel
    if backbone is not None:
        load_vgg_backbone(model, *backbone)
        print(f"LPIPS: VGG16 backbone from {backbone[1]}")
    model.eval()
    model.requires_grad_(False)
    return model


def _download_backbone(cache: Path) -> dict[str, torch.Tensor]:
    import torchvision.models

    try:
        vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    except Exception as e:  # no network, proxy, hub errors: all end the same way
        raise PerceptualWeightsMissing(
            _MISSING_MESSAGE.format(reason=f"{type(e).__name__}: {e}", cache=cache.parent)) from e
    return vgg.features.state_dict()
