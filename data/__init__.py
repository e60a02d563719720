"""Datasets for both stages, named by spec strings (`synthetic:shapes`, `folder:PATH`, `npz:FILE`,
`hf:NAME`, `wds:URLS`, `mix:REAL|SYNTHETIC?synthetic=F`), and `pack_dataset` to turn any of them
into webdataset shards.

Imports no model code: `stage1_tokenizer` depends on `data`, never the other way round.
Every item is `(image (3, R, R) float32 in [-1, 1], label int or -1)`; every dataset has
`class_names`, `num_classes` (None when unlabelled), `resolution`, `set_epoch(epoch)` (seeded
random crops/flips and stream shuffling follow it), `skipped_files` and `skip_log`. synthetic,
folder, npz and hf are map-style; wds and hf with streaming=1 are IterableDatasets that split
their data by rank and DataLoader worker themselves; a mix is map-style when both its sources are.
"""
from data.errors import DataSourceError, read_skip_log, record_skip
from data.folder import ImageFolderDataset
from data.loader import ResumableLoader
from data.mix import MixedImages, MixedStream, mix_datasets
from data.pack import pack_dataset
from data.sources import build_dataset, parse_spec
from data.synthetic import SHAPE_CLASSES, SyntheticShapes
from data.transforms import IMAGE_EXTENSIONS, TransformConfig, apply_transform, load_image, to_rgb, to_tensor
from data.wds import WdsImages

__all__ = [
    "build_dataset", "parse_spec", "pack_dataset", "DataSourceError", "record_skip", "read_skip_log",
    "TransformConfig", "apply_transform", "to_rgb", "SyntheticShapes", "SHAPE_CLASSES",
    "ImageFolderDataset", "WdsImages", "IMAGE_EXTENSIONS", "load_image", "to_tensor", "ResumableLoader",
    "MixedImages", "MixedStream", "mix_datasets",
]
