"""Images/s of the data sources: an image folder, webdataset shards and an HF dataset saved to disk.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/data_throughput.py [--images 2000] [--resolution 64] [--workers 0 2]

Makes `--images` synthetic shapes at 128 px, saved as JPEG (quality 95) in a temporary folder,
then packs them into shards with `pack_dataset` (JPEG, quality 95, native size) and into a
`datasets.Dataset` of the same JPEG bytes, and reads each back at `--resolution` through a
DataLoader (batch 64) with each worker count. One untimed epoch warms the page cache; the
timed epoch includes DataLoader worker start-up, as every epoch of a non-persistent loader does.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402

from data import SyntheticShapes, build_dataset, pack_dataset  # noqa: E402


def make_sources(root: Path, n: int) -> dict[str, str]:
    """The same n JPEGs as a class folder, webdataset shards and a saved HF dataset; spec per source."""
    import datasets

    datasets.disable_progress_bars()
    shapes = SyntheticShapes(resolution=128, size=n)
    paths, labels = [], []
    for i in range(n):
        image, label, _ = shapes.pil_item(i)
        path = root / "folder" / shapes.class_names[label] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95)
        paths.append(path)
        labels.append(label)
    folder = f"folder:{root / 'folder'}?val_fraction=0"
    manifest = pack_dataset(folder, root / "wds", shard_size=250, image_format="jpg", progress=False)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=shapes.class_names)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in paths], "label": labels}, features=features)
    table.save_to_disk(str(root / "hf"))
    last = len(manifest["shards"]) - 1
    return {"folder": folder, "webdataset": f"wds:{root}/wds/shard-{{000000..{last:06d}}}.tar",
            "hf (saved to disk)": f"hf:{root / 'hf'}"}


def time_epoch(spec: str, resolution: int, batch_size: int, workers: int) -> tuple[float, int]:
    dataset = build_dataset(spec, resolution=resolution, split="train")
    shuffle = None if isinstance(dataset, IterableDataset) else True  # iterables shuffle themselves
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm the page cache
        pass
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    print(machine_header())
    with tempfile.TemporaryDirectory(prefix="data-throughput-") as tmp:
        start = time.perf_counter()
        specs = make_sources(Path(tmp), args.images)
        print(f"made {args.images} JPEGs (128 px) as folder, shards and HF dataset in "
              f"{time.perf_counter() - start:.1f} s; reading at {args.resolution} px, batch {args.batch_size}\n")
        print(f"| {'source':<20} | workers | images/s | epoch s |")
        print(f"|{'-' * 22}|---------|----------|---------|")
        for name, spec in specs.items():
            for workers in args.workers:
                seconds, count = time_epoch(spec, args.resolution, args.batch_size, workers)
                print(f"| {name:<20} | {workers:>7} | {count / seconds:>8.0f} | {seconds:>7.2f} |", flush=True)


if __name__ == "__main__":
    main()
