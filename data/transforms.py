"""Image file -> RGB PIL image -> (3, R, R) float32 tensor in [-1, 1].

Deterministic on purpose: no random augmentation, so a resumed run sees exactly the pixels the
interrupted one would have seen.
"""
from __future__ import annotations

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


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as a fully loaded RGB PIL image with its EXIF orientation applied.

    Handles grayscale (8/16/32-bit), transparency (RGBA, LA, palette or grayscale with a
    transparent colour; composited on white), CMYK and any other mode Pillow can convert.
    Raises whatever Pillow raises for a file it cannot decode."""
    with Image.open(path) as img:
        img.load()
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


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic, antialiased when shrinking), centre-crop
    to a square and scale to [-1, 1]: RGB PIL image -> (3, R, R) float32."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != img.size:
        # Pillow widens the bicubic kernel by the shrink factor, i.e. antialiases; reducing_gap=None
        # keeps it an exact resample instead of a faster box pre-reduction
        img = img.resize(size, Image.BICUBIC, reducing_gap=None)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (R, R, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
