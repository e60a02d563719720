"""NpzImages: images stored as one uint8 array in a `.npz` file (e.g. CIFAR-10 exports)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.errors import DataSourceError


class NpzImages(Dataset):
    """`images` uint8 (N, H, W, 3) and optional `labels` int (N,) and `class_names` (JSON string
    array). Every split reads the whole file (pass separate files for train and val); images are
    resized to `resolution` (bicubic, antialiased) when their size differs."""

    def __init__(self, path: str | Path, resolution: int, class_names: list[str] | None = None):
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
        if self.labels is None:
            self.class_names, self.num_classes = None, None
        else:
            n = int(self.labels.max()) + 1
            names = class_names or stored_names or [str(i) for i in range(n)]
            self.class_names, self.num_classes = list(names), len(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div(127.5).sub(1.0)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.shape[1:] != (self.resolution, self.resolution):
            image = F.interpolate(image[None], size=(self.resolution, self.resolution), mode="bicubic",
                                  antialias=True, align_corners=False)[0].clamp(-1, 1)
        label = int(self.labels[index]) if self.labels is not None else -1
        return image.contiguous(), label
