"""Datasets for both stages, named by spec strings (`synthetic:shapes`, `folder:PATH`).

Imports no model code: `stage1_tokenizer` depends on `data`, never the other way round.
Every dataset is map-style, `ds[i] -> (image (3, R, R) float32 in [-1, 1], label int or -1)`,
with attributes `class_names`, `num_classes` (None when unlabelled) and `resolution`.
"""
from data.errors import DataSourceError
from data.folder import ImageFolderDataset
from data.sources import build_dataset, parse_spec
from data.synthetic import SHAPE_CLASSES, SyntheticShapes
from data.transforms import IMAGE_EXTENSIONS, load_image, to_tensor

__all__ = [
    "build_dataset", "parse_spec", "DataSourceError", "SyntheticShapes", "SHAPE_CLASSES",
    "ImageFolderDataset", "IMAGE_EXTENSIONS", "load_image", "to_tensor",
]
