"""SyntheticShapes: the embedded default dataset, one coloured shape on a textured background.

Needs no download, renders any resolution from 16 to 256 px in well under a millisecond at 32 px,
and is exactly reproducible: item i of a split depends only on (seed, split, i). The class is the
shape type, so a tokenizer can be trained on it and a class-conditional prior checked on it.
"""
from __future__ import annotations

import colorsys
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.transforms import SeededTransform, TransformConfig, tensor_to_pil

# Ten shapes that stay distinguishable at 16-32 px under any rotation (a diamond is an elongated
# rhombus, not a rotated square; a hexagon was left out because it reads as a circle at 16 px).
SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart", "crescent", "bar",
)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# Each shape is an inside-test on coordinates (u, v) of the shape's own frame, scaled so the
# shape fits in the unit disc; v points down the image.
ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # equilateral, vertices on the unit circle: three half-planes at inradius 0.5
    return (v <= 0.5) & (0.866 * u - 0.5 * v <= 0.5) & (-0.866 * u - 0.5 * v <= 0.5)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) * (1 / 0.6) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b = np.abs(u), np.abs(v)
    return ((a <= 0.3) & (b <= 0.92)) | ((b <= 0.3) & (a <= 0.92))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)


_STAR_PERIOD = 2 * math.pi / 5
_STAR_INNER = 0.45  # a regular pentagram has 0.38; a little fatter survives downsampling
# python floats, not numpy scalars: those would promote the float32 grids to float64 (NEP 50)
_STAR_B = (float(_STAR_INNER * np.cos(_STAR_PERIOD / 2)), float(_STAR_INNER * np.sin(_STAR_PERIOD / 2)))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # fold the angle into one half-spike, then test against the edge outer tip (1, 0) -> inner vertex B
    theta = np.mod(np.arctan2(v, u), _STAR_PERIOD) - _STAR_PERIOD / 2
    rho = np.sqrt(u * u + v * v)
    x, y = rho * np.cos(theta), rho * np.abs(np.sin(theta))
    return (_STAR_B[0] - 1.0) * y - _STAR_B[1] * (x - 1.0) >= 0.0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # the classic implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, y up, shifted and scaled into the disc
    x, y = u * 1.2, -v * 1.2 + 0.15
    q = x * x + y * y - 1.0
    return q * q * q <= x * x * y * y * y


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.8 ** 2)


def _bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.32)


SHAPE_FNS: dict[str, ShapeFn] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond,
    "cross": _cross, "ring": _ring, "star": _star, "heart": _heart, "crescent": _crescent, "bar": _bar,
}
# a heart upside down reads as something else; every other shape may take any rotation
MAX_ROTATION = {"heart": 0.6}
# layout "centered": the shape's centre within 5 % of the side of the image centre, turned at most
# 0.2 rad (11 degrees) from upright
LAYOUTS = ("free", "centered")
CENTERED_JITTER, CENTERED_ROTATION = 0.05, 0.2


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _with_luma(rgb: np.ndarray, target: float) -> np.ndarray:
    """Darken towards black or lighten towards white until the luma is exactly `target`."""
    luma = _luma(rgb)
    if target <= luma:
        return rgb * (target / max(luma, 1e-6))
    return rgb + (1.0 - rgb) * ((target - luma) / max(1.0 - luma, 1e-6))


# smooth: gradients and noise blobs only, no stripes or checkerboards; plain: one flat colour
TEXTURES = ("all", "smooth", "plain")


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, res: int,
                textures: str = "all") -> np.ndarray:
    """A texture field t in [0, 1], (R, R) float32; x is (1, R), y is (R, 1), both in [-0.5, 0.5].
    The periodic ones are soft-clipped sines so their edges are antialiased without supersampling."""
    if textures == "plain":
        return np.zeros((y.shape[0], x.shape[1]), dtype=np.float32)
    kind = int(rng.integers(4)) if textures == "all" else (0, 3)[int(rng.integers(2))]
    theta = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    if kind == 0:  # smooth two-colour gradient
        return np.clip((x * c + y * s) * rng.uniform(0.8, 1.4) + 0.5, 0.0, 1.0)
    if kind == 1:  # stripes at a random angle; sharpness capped so a transition spans >= ~2 px
        freq = rng.uniform(2.0, 6.0)
        sharp = rng.uniform(1.0, max(1.0, min(4.0, res / (2 * math.pi * freq))))
        wave = np.sin((x * c + y * s) * (2 * math.pi * freq) + rng.uniform(0, 2 * math.pi))
        return 0.5 + 0.5 * np.clip(sharp * wave, -1.0, 1.0)
    if kind == 2:  # rotated checkerboard
        cells = int(rng.integers(3, 9))
        sharp = rng.uniform(1.0, max(1.0, min(6.0, res / (math.pi * cells))))
        a, b = x * c + y * s, y * c - x * s
        phase_a, phase_b = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        wave = np.sin(a * (math.pi * cells) + phase_a) * np.sin(b * (math.pi * cells) + phase_b)
        return 0.5 + 0.5 * np.clip(sharp * wave, -1.0, 1.0)
    # low-frequency noise blobs: a rank-3 sum of separable sines, one (R, 3) @ (3, R) product
    k = 3
    fx, fy = rng.uniform(0.5, 2.5, size=(2, k, 1)).astype(np.float32)
    px, py = rng.uniform(0, 2 * math.pi, size=(2, k, 1)).astype(np.float32)
    amp = rng.uniform(0.3, 1.0, size=(k, 1)).astype(np.float32)
    rows = np.sin((2 * math.pi) * fy * y.reshape(1, -1) + py) * amp  # (k, R)
    cols = np.sin((2 * math.pi) * fx * x.reshape(1, -1) + px)        # (k, R)
    t = rows.T @ cols
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) * (1.0 / max(hi - lo, 1e-6))


def _box_downsample(mask: np.ndarray, ss: int) -> np.ndarray:
    """Coverage of each ss x ss block of a bool mask, (H*ss, W*ss) -> (H, W) float32. Strided sums,
    because numpy's reduction over the axes of a (H, ss, W, ss) view is ~10x slower."""
    rows = mask[0::ss].astype(np.float32)
    for a in range(1, ss):
        rows += mask[a::ss]
    cover = rows[:, 0::ss].copy()
    for b in range(1, ss):
        cover += rows[:, b::ss]
    return cover * (1.0 / (ss * ss))


class SyntheticShapes(Dataset):
    """Map-style dataset of `size` images; `ds[i]` is `(image, label)` with image (3, R, R) float32
    in [-1, 1] and label = i % num_classes, the index of the shape in `class_names`.

    `shape_size` is the range of the shape's diameter as a fraction of the side; `textures="smooth"`
    leaves out the striped and checkered backgrounds, `"plain"` paints one flat colour. Both only
    change how hard the images are: small shapes on busy textures are ambiguous once an f4
    tokenizer has coded a 32 px image, and a small prior learns flat backgrounds in a few steps.
    `layout="centered"` puts every shape near the centre, nearly upright: the easiest variant.

    Images are rendered at their final size, so `transform.crop` is ignored; `transform.hflip`
    flips item i of epoch e (`set_epoch`) when `default_rng([seed, e, i])` says so."""

    def __init__(self, resolution: int = 32, num_classes: int = 10, size: int = 20000,
                 split: str = "train", seed: int = 0, transform: TransformConfig | None = None,
                 shape_size: tuple[float, float] = (0.35, 0.75), textures: str = "all", layout: str = "free"):
        if not isinstance(resolution, int) or not 16 <= resolution <= 256:
            raise ValueError(f"SyntheticShapes: resolution must be an integer in 16..256, got {resolution!r}")
        if not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"SyntheticShapes: num_classes must be in 2..{len(SHAPE_CLASSES)}, got {num_classes!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"SyntheticShapes: size must be a positive integer, got {size!r}")
        if split not in SPLIT_IDS:
            raise ValueError(f"SyntheticShapes: split must be one of {list(SPLIT_IDS)}, got {split!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SyntheticShapes: seed must be a non-negative integer, got {seed!r}")
        lo, hi = (float(v) for v in shape_size)
        if not 0.1 <= lo <= hi <= 1.0:
            raise ValueError(f"SyntheticShapes: shape_size must be (min, max) with 0.1 <= min <= max <= 1, "
                             f"got {tuple(shape_size)!r}")
        if textures not in TEXTURES:
            raise ValueError(f"SyntheticShapes: textures must be one of {list(TEXTURES)}, got {textures!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"SyntheticShapes: layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.resolution, self.num_classes, self.size, self.split, self.seed = resolution, num_classes, size, split, seed
        self.shape_size, self.textures, self.layout = (lo, hi), textures, layout
        self.class_names: list[str] = list(SHAPE_CLASSES[:num_classes])
        self.skipped_files: list[str] = []  # nothing here is unreadable; kept for a uniform interface
        self.skip_log = None
        self._augment = SeededTransform(TransformConfig(hflip=True) if transform and transform.hflip else None, seed)
        # supersample the shape 4x (2x above 128 px) and box-downsample: antialiasing at a fixed cost
        self.supersample = 4 if resolution <= 128 else 2
        ss = self.supersample
        self._hr = ((np.arange(resolution * ss) + 0.5) / ss).astype(np.float32)  # sub-pixel centres, output px
        grid = ((np.arange(resolution) + 0.5) / resolution - 0.5).astype(np.float32)
        self._x, self._y = grid.reshape(1, -1), grid.reshape(-1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.size <= index < self.size:
            raise IndexError(f"SyntheticShapes index {index} out of range for size {self.size}")
        index %= self.size
        image, label = self._render_item(index)
        flip_rng = self._augment.rng(index)
        if flip_rng is not None and flip_rng.random() < 0.5:
            image = image.flip(-1)
        return image, label

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the random flip (if any) draws from; also reaches DataLoader workers."""
        self._augment.set_epoch(epoch)

    def pil_item(self, index: int) -> tuple[Image.Image, int, str | None]:
        """Item `index` unflipped, for packing: (RGB PIL image of R x R, label, None)."""
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticShapes index {index} out of range for size {self.size}")
        image, label = self._render_item(index)
        return tensor_to_pil(image), label, None

    def _render_item(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % self.num_classes
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_IDS[self.split], index]))
        return torch.from_numpy(self.render(rng, SHAPE_CLASSES[label])), label

    def render(self, rng: np.random.Generator, shape: str) -> np.ndarray:
        """Draw one image of `shape` from `rng`: (3, R, R) float32 in [-1, 1]."""
        res, ss = self.resolution, self.supersample

        # colours: a saturated shape, a muted background whose brightness is >= 0.2 away in luma
        hue = rng.uniform()
        fg = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
        fg_luma = _luma(fg)
        lo, hi = (0.12, fg_luma - 0.22) if fg_luma > 0.5 else (fg_luma + 0.25, 0.92)
        bg_hue, bg_sat = hue + rng.uniform(0.25, 0.75), rng.uniform(0.08, 0.4)
        c1 = _with_luma(_hsv(bg_hue, bg_sat, 1.0), rng.uniform(lo, hi))
        c2_hue, c2_sat = bg_hue + rng.uniform(-0.1, 0.1), bg_sat * rng.uniform(0.5, 1.0)
        c2 = _with_luma(_hsv(c2_hue, c2_sat, 1.0), rng.uniform(lo, hi))
        t = _background(rng, self._x, self._y, res, self.textures)
        # channels first: numpy broadcasting with an innermost axis of length 3 is several times slower
        image = c1[:, None, None] + (c2 - c1)[:, None, None] * t  # (3, R, R)

        # geometry in output pixels: diameter a shape_size fraction of the side, at least ~85 % of it inside
        radius = rng.uniform(*self.shape_size) * res / 2
        if self.layout == "centered":
            cx, cy = res / 2 + rng.uniform(-CENTERED_JITTER, CENTERED_JITTER, size=2) * res
            angle = rng.uniform(-CENTERED_ROTATION, CENTERED_ROTATION)
        else:
            margin = 0.85 * radius
            cx, cy = rng.uniform(margin, res - margin), rng.uniform(margin, res - margin)
            max_rot = MAX_ROTATION.get(shape, math.pi)
            angle = rng.uniform(-max_rot, max_rot)
        cos, sin = math.cos(angle), math.sin(angle)

        # render only the shape's bounding box, at ss x ss sub-pixels per pixel; 1.1x because the
        # square's corners poke just outside the unit disc
        extent = 1.1 * radius
        x0, x1 = max(int(cx - extent), 0), min(math.ceil(cx + extent), res)
        y0, y1 = max(int(cy - extent), 0), min(math.ceil(cy + extent), res)
        dx = ((self._hr[x0 * ss:x1 * ss] - cx) / radius).reshape(1, -1)
        dy = ((self._hr[y0 * ss:y1 * ss] - cy) / radius).reshape(-1, 1)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        inside = SHAPE_FNS[shape](u, v)  # (h*ss, w*ss) bool
        alpha = _box_downsample(inside, ss)  # (h, w) coverage
        crop = image[:, y0:y1, x0:x1]
        crop += alpha * (fg[:, None, None] - crop)
        image *= 2.0
        image -= 1.0
        return image
