"""ImageFolderDataset: images under a directory, one class per first-level sub-folder.

Layouts, checked in this order:
- `root/train/` plus `root/val/` and/or `root/test/`: each split reads its own sub-tree.
- `root/<class>/...`: one split by a hash of each file's relative path (stable when files are
  added, and identical for every training seed).
- `root/*.png` with no class sub-folders: unlabelled (label -1).

Class ids follow the sorted sub-folder names, unless `root/classes.json` (a JSON list of class
names in id order, as `vqgan augment` writes next to its generated images) fixes the order: then
ids match the model that generated the folder, and listed classes without a sub-folder still count.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import DataSourceError, load_or_next
from data.transforms import IMAGE_EXTENSIONS, SeededTransform, TransformConfig, load_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.json"


def _list_images(directory: Path) -> list[Path]:
    """All image files below `directory`, recursively, in a platform-independent sorted order.
    Hidden files and folders (`.ipynb_checkpoints`, `.DS_Store`, ...) are skipped: they are never data."""
    found = [p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(directory).parts) and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def _read_class_order(root: Path) -> list[str] | None:
    """The class names listed in `root/classes.json` in id order, or None when there is no such file."""
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataSourceError(f"class list {str(path)!r} cannot be read: {e}") from e
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise DataSourceError(f"class list {str(path)!r}: expected a JSON list of unique, non-empty class-name "
                              f"strings (the sub-folder names in class-id order), got {str(names)[:200]}")
    return names


def _hash_fraction(relative_path: str) -> float:
    """Map a path to a fixed number in [0, 1): the split a file lands in never depends on which
    other files exist or on the order the file system lists them."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


class ImageFolderDataset(Dataset):
    """Map-style dataset over an image folder; `ds[i]` is `(image, label)` with image (3, R, R)
    float32 in [-1, 1] and label the class index, or -1 when the folder has no class sub-folders.

    A file that fails to load is recorded with `record_skip` (`skipped_files`, per process, and
    `skip_log` when set) and replaced by the next loadable item. With a random `transform`, item i
    of epoch e (`set_epoch`) is cropped/flipped by `default_rng([seed, e, i])`."""

    def __init__(self, root: str | Path, resolution: int, split: str = "train",
                 val_fraction: float = 0.02, seed: int = 0, transform: TransformConfig | None = None):
        # `seed` drives only the random transform: the split is deliberately seed-independent so
        # runs with different seeds share one val set
        self.root = Path(root).expanduser()
        if split not in SPLITS:
            raise DataSourceError(f"image folder {str(self.root)!r}: split must be one of {list(SPLITS)}, "
                                  f"got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataSourceError(f"image folder {str(self.root)!r}: val_fraction must be in [0, 1), "
                                  f"got {val_fraction!r}")
        if not isinstance(resolution, int) or resolution < 1:
            raise DataSourceError(f"image folder {str(self.root)!r}: resolution must be a positive integer, "
                                  f"got {resolution!r}")
        if not self.root.is_dir():
            raise DataSourceError(f"image folder {str(self.root)!r} does not exist or is not a directory "
                                  f"(looked for images with extensions {' '.join(IMAGE_EXTENSIONS)})")
        self.resolution, self.split, self.val_fraction, self.seed = resolution, split, val_fraction, seed
        self.skipped_files: list[str] = []
        self.skip_log: Path | None = None  # set by a training loop to collect skips from every process
        self._bad: set[int] = set()
        self._augment = SeededTransform(transform, seed)

        split_dirs = {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        if "train" in split_dirs and ("val" in split_dirs or "test" in split_dirs):
            # `test` falls back to `val` and vice versa, mirroring the hash split where they are one set
            other = "test" if split == "val" else "val"
            tree = split_dirs.get(split) or split_dirs[other]
            listings = {t: _list_images(t) for t in split_dirs.values()}
            files = listings[tree]
        else:
            tree = self.root
            listings = {tree: _list_images(tree)}
            files = [p for p in listings[tree] if self._in_split(p.relative_to(tree).as_posix())]

        # classes come from every split's tree, so an index means the same class in train and val
        class_names = sorted({p.relative_to(t).parts[0] for t, listing in listings.items() for p in listing
                              if len(p.relative_to(t).parts) > 1})
        order = _read_class_order(self.root)
        if order is not None:
            unlisted = [name for name in class_names if name not in order]
            if unlisted or not class_names:
                raise DataSourceError(
                    f"class list {str(self.root / CLASSES_FILE)!r}: "
                    + (f"sub-folder(s) {', '.join(map(repr, unlisted))} are not listed in it (it lists "
                       f"{', '.join(map(repr, order))})" if unlisted else
                       "the folder has no class sub-folders to order; remove the file for an unlabelled folder"))
            class_names = order  # ids as written, so they match the model that generated the images
        if class_names:
            stray = [p for p in files if len(p.relative_to(tree).parts) == 1]
            if stray:
                logger.warning("image folder %s: ignoring %d image(s) directly in %s, outside the class "
                               "sub-folders (first: %s)", self.root, len(stray), tree, stray[0].name)
                files = [p for p in files if len(p.relative_to(tree).parts) > 1]
            index = {name: i for i, name in enumerate(class_names)}
            self.labels = [index[p.relative_to(tree).parts[0]] for p in files]
            self.class_names: list[str] | None = class_names
            self.num_classes: int | None = len(class_names)
        else:
            self.labels = [-1] * len(files)
            self.class_names, self.num_classes = None, None
        self.files = files

        if not files:
            raise DataSourceError(
                f"image folder {str(tree)!r}: no images for split {split!r} (looked recursively for "
                f"extensions {' '.join(IMAGE_EXTENSIONS)}"
                + (f"; val_fraction={val_fraction} of the files go to val/test)" if tree == self.root else ")"))

    def _in_split(self, relative_path: str) -> bool:
        held_out = _hash_fraction(relative_path) < self.val_fraction
        return held_out if self.split in ("val", "test") else not held_out

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the random transform (if any) draws from; also reaches DataLoader workers."""
        self._augment.set_epoch(epoch)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return self._augment(load_image(self.files[index]), self.resolution, index), self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_or_next(self, index, self._load, lambda i: str(self.files[i]), f"image folder {str(self.root)!r}")

    def pil_item(self, index: int) -> tuple[Image.Image, int, str | None]:
        """Item `index` untransformed, for packing: (RGB PIL image at its own size, label, file name
        relative to the root). Raises when the file cannot be decoded."""
        return load_image(self.files[index]), self.labels[index], self.files[index].relative_to(self.root).as_posix()
