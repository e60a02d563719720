"""NpzImages: images stored as one uint8 array in a `.npz` file (e.g. CIFAR-10 exports)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import DataSourceError
from data.transforms import SeededTransform, TransformConfig, to_rgb


class NpzImages(Dataset):
    """`images` uint8 (N, H, W, 3) and optional `labels` int (N,) and `class_names` (JSON string
    array). Every split reads the whole file (pass separate files for train and val); images go
    through the same resize/crop as image files (`data.transforms.apply_transform`), with a
    random `transform` drawn from `default_rng([seed, epoch, index])`."""

    def __init__(self, path: str | Path, resolution: int, class_names: list[str] | None = None,
                 seed: int = 0, transform: TransformConfig | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataSourceError(f"npz file {str(self.path)!r} does not exist")
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                if "images" not in archive.files:
                    raise DataSourceError(f"npz file {str(self.path)!r}: expected an 'images' array, "
                                          f"found {archive.files}")
                self.images = np.ascontiguousarray(archive["images"])
                self.labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
                stored_names = json.loads(str(archive["class_names"])) if "class_names" in archive.files else None
        except (OSError, ValueError) as e:
            raise DataSourceError(f"npz file {str(self.path)!r} cannot be read: {e}") from e
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise DataSourceError(f"npz file {str(self.path)!r}: 'images' must be uint8 (N, H, W, 3), "
                                  f"got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataSourceError(f"npz file {str(self.path)!r}: {len(self.labels)} labels for "
                                  f"{len(self.images)} images")
        if len(self.images) == 0:
            raise DataSourceError(f"npz file {str(self.path)!r} holds no images")
        self.resolution = resolution
        self.skipped_files: list[str] = []  # nothing in an array is unreadable; kept for a uniform interface
        self.skip_log: Path | None = None
        self._augment = SeededTransform(transform, seed)
        if self.labels is None:
            self.class_names, self.num_classes = None, None
        else:
            n = int(self.labels.max()) + 1
            names = class_names or stored_names or [str(i) for i in range(n)]
            self.class_names, self.num_classes = list(names), len(names)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the random transform (if any) draws from; also reaches DataLoader workers."""
        self._augment.set_epoch(epoch)

    def _pil(self, index: int) -> Image.Image:
        pixels = self.images[index]  # (H, W, 3) or (H, W, 1) uint8
        return to_rgb(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.images)
        if not -n <= index < n:
            raise IndexError(f"NpzImages index {index} out of range for {n} images")
        index %= n
        label = int(self.labels[index]) if self.labels is not None else -1
        return self._augment(self._pil(index), self.resolution, index), label

    def pil_item(self, index: int) -> tuple[Image.Image, int, str | None]:
        """Item `index` untransformed, for packing: (RGB PIL image, label, None)."""
        return self._pil(index), int(self.labels[index]) if self.labels is not None else -1, None
