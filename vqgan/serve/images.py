"""Uploaded bytes -> checked RGB tensors, and tensors -> PNG bytes, for the HTTP server.

Every upload passes `read_image`: the declared content type, the pixel count (read from the header,
before any pixel is decoded) and the decoder's verdict are checked, each failing with an
`UploadError` carrying the HTTP status and a message for the client.
"""
from __future__ import annotations

import base64
import io

import torch
from PIL import Image, UnidentifiedImageError

from data import to_rgb, to_tensor
from data.transforms import tensor_to_pil

# content type -> the Pillow formats the bytes may decode as (a PNG sent as image/jpeg is refused);
# MPO is how Pillow names the multi-picture JPEGs many phone cameras write
IMAGE_TYPES = {"image/png": ("PNG",), "image/jpeg": ("JPEG", "MPO"), "image/jpg": ("JPEG", "MPO"),
               "image/webp": ("WEBP",), "image/bmp": ("BMP",)}


class UploadError(Exception):
    """An upload the server refuses: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def read_image(data: bytes, content_type: str | None, max_pixels: int, field: str = "image") -> Image.Image:
    """Encoded image bytes -> fully loaded RGB PIL image; 415 wrong type, 413 too many pixels, 400 corrupt."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise UploadError(415, f"{field}: content type {content_type or 'none'!r} is not accepted; "
                               f"send image/png, image/jpeg, image/webp or image/bmp")
    if not data:
        raise UploadError(400, f"{field}: the upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:  # checked on the header: a decompression bomb is never decoded
                raise UploadError(413, f"{field}: {width}x{height} = {width * height} pixels exceeds the limit of "
                                       f"{max_pixels} pixels")
            if img.format not in IMAGE_TYPES[kind]:
                raise UploadError(415, f"{field}: declared {kind} but the bytes are {img.format or 'not an image'}")
            img.load()
            return to_rgb(img)
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError(400, f"{field}: could not decode the image: not a PNG, JPEG, WebP or BMP file, "
                               f"or corrupt") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken or truncated files
        raise UploadError(400, f"{field}: could not decode the image ({type(e).__name__}: {e})") from None


def image_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> (3, R, R) in [-1, 1]: shorter side resized to R, centre crop (as the tokenizer was trained)."""
    return to_tensor(img, resolution)


def mask_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """A mask picture (white = edit) of the image's shape -> pixel mask (R, R), cropped like the image."""
    return to_tensor(img, resolution).mean(dim=0) > 0


def png_bytes(image: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> PNG bytes (lossless, so a seed gives the same bytes every time)."""
    buffer = io.BytesIO()
    tensor_to_pil(image.cpu()).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def grey_positions(image: torch.Tensor, positions: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, H, W): pixels of the code positions where `positions` (h, w) is True set to mid-grey."""
    pixels = positions.repeat_interleave(factor, 0).repeat_interleave(factor, 1).to(image.device)
    return image.masked_fill(pixels, 0.0)


def grey_from_row(image: torch.Tensor, row: int, factor: int) -> torch.Tensor:
    """(3, H, W): pixels of code rows >= `row` set to mid-grey (0 in [-1, 1]): not sampled yet."""
    image = image.clone()
    image[:, row * factor:] = 0.0
    return image
