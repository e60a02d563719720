"""Image file or bytes -> RGB PIL image -> (3, R, R) float32 tensor in [-1, 1].

Augmentation (random crop, horizontal flip) is optional and never depends on global random
state: a dataset draws item i's randomness from `np.random.default_rng([seed, epoch, i])`, so a
resumed run sees exactly the pixels the interrupted one would have seen.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with transparency over white, the usual reading of a transparent
    background (black would turn dark line art on transparent PNGs into a black square)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 instead of rescaling, so most of a 16-bit
    # PNG would come out white; "I" is how Pillow opens 16-bit grayscale PNGs, so scale 65535 -> 255
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB with its EXIF orientation applied: grayscale (8/16/32-bit),
    transparency (RGBA, LA, palette or grayscale with a transparent colour; composited on white),
    CMYK and any other mode Pillow can convert. Every source (files, HF datasets, shards) goes
    through here so one photo gives the same pixels whichever way it arrives."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GRAY_MODES:
        img = _wide_gray_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img)
    if img.mode == "P":
        return _on_white(img)  # via RGBA: a palette may carry alpha per entry
    if img.mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, F, ...


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as a fully loaded RGB PIL image (see `to_rgb`).
    Raises whatever Pillow raises for a file it cannot decode."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) -> fully loaded RGB PIL image (see `to_rgb`)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return to_rgb(img)


@dataclass
class TransformConfig:
    """How an image becomes a square: resize the shorter side to R, then a `crop` ("center" or
    "random") of R x R, then a horizontal flip with probability 0.5 when `hflip`."""
    crop: str = "center"
    hflip: bool = False

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"TransformConfig.crop must be 'center' or 'random', got {self.crop!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"TransformConfig.hflip must be true or false, got {self.hflip!r}")

    @property
    def is_random(self) -> bool:
        return self.crop == "random" or self.hflip


def resize_crop(img: Image.Image, resolution: int, transform: TransformConfig | None = None,
                rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic, antialiased when shrinking), crop a square
    (centre, or at an offset drawn from `rng`) and maybe flip: RGB PIL image -> R x R PIL image."""
    transform = transform or TransformConfig()
    if transform.is_random and rng is None:
        raise ValueError("a random transform (random crop or hflip) needs an rng; derive it from "
                         "(seed, epoch, index) so resumed runs see the same pixels")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != img.size:
        # Pillow widens the bicubic kernel by the shrink factor, i.e. antialiases; reducing_gap=None
        # keeps it an exact resample instead of a faster box pre-reduction
        img = img.resize(size, Image.BICUBIC, reducing_gap=None)
    if transform.crop == "random":
        left, top = int(rng.integers(size[0] - resolution + 1)), int(rng.integers(size[1] - resolution + 1))
    else:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    if (left, top, size) != (0, 0, (resolution, resolution)):
        img = img.crop((left, top, left + resolution, top + resolution))
    if transform.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image (H, W) -> (3, H, W) float32 in [-1, 1]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [-1, 1] -> RGB PIL image, rounding to the nearest uint8 level."""
    pixels = image.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def apply_transform(img: Image.Image, resolution: int, transform: TransformConfig | None = None,
                    rng: np.random.Generator | None = None) -> torch.Tensor:
    """`resize_crop` then scale to [-1, 1]: RGB PIL image -> (3, R, R) float32. `rng` is needed
    only when the transform is random."""
    return pil_to_tensor(resize_crop(img, resolution, transform, rng))


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution`, centre-crop to a square and scale to [-1, 1]:
    RGB PIL image -> (3, R, R) float32 (`apply_transform` without randomness)."""
    return apply_transform(img, resolution)


def _key_to_int(key: int | str) -> int:
    if isinstance(key, int):
        return key
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


class SeededTransform:
    """A dataset's transform plus the epoch its randomness is drawn from: item `key` (an index or
    a sample key) of epoch e uses `np.random.default_rng([seed, e, key])`.

    The epoch lives in a shared-memory tensor (when the transform is random, or `shared`), so
    `set_epoch` in the main process also reaches persistent DataLoader workers, which hold a copy
    of the dataset made at their start."""

    def __init__(self, transform: TransformConfig | None, seed: int, shared: bool = False):
        self.transform, self.seed = transform, seed
        self._epoch = torch.zeros((), dtype=torch.int64)
        if self.is_random or shared:
            self._epoch.share_memory_()

    @property
    def is_random(self) -> bool:
        return self.transform is not None and self.transform.is_random

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng(self, key: int | str, *extra: int) -> np.random.Generator | None:
        """The generator for one item this epoch; None when nothing is random."""
        if not self.is_random:
            return None
        return np.random.default_rng([self.seed, self.epoch, _key_to_int(key), *extra])

    def __call__(self, img: Image.Image, resolution: int, key: int | str) -> torch.Tensor:
        return apply_transform(img, resolution, self.transform, self.rng(key))
