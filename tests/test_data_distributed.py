"""Two processes (torch.distributed, gloo on 127.0.0.1), each with two DataLoader workers: every
source hands each rank a disjoint part of the data, together all of it, in an order fixed by
the seed. Map-style sources go through accelerate's seedable sampler as the training loop does;
wds and streamed hf sources split by rank and worker themselves."""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader

from data import build_dataset, pack_dataset

N, BATCH, WORLD, WORKERS, SEED = 24, 4, 2, 2, 1234  # N divisible by BATCH * WORLD


def _id_image(i: int) -> Image.Image:
    pixels = np.empty((8, 8, 3), dtype=np.uint8)
    pixels[...] = (i, 0, 77)
    return Image.fromarray(pixels)


def _ids(images: torch.Tensor) -> list[int]:
    return ((images[:, 0, 0, 0] + 1) * 127.5).round().to(torch.int64).tolist()  # (B,) ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_sources(root: Path) -> dict[str, str]:
    import datasets

    datasets.disable_progress_bars()
    for i in range(N):
        (root / "folder" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        _id_image(i).save(root / "folder" / f"c{i % 3}" / f"{i:02d}.png")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"image": [_id_image(i) for i in range(N)], "label": [i % 3 for i in range(N)]},
                               features=features).save_to_disk(str(root / "hf"))
    folder = f"folder:{root / 'folder'}?val_fraction=0"
    pack_dataset(folder, root / "wds8", shard_size=3, progress=False)  # 8 shards: split by shard
    pack_dataset(folder, root / "wds1", shard_size=N, progress=False)  # 1 shard: split by sample
    return {"folder": folder, "hf": f"hf:{root / 'hf'}", "hf_stream": f"hf:{root / 'hf'}?streaming=1&shuffle=8",
            "wds8": f"wds:{root}/wds8/shard-{{000000..000007}}.tar", "wds1": f"wds:{root}/wds1/shard-000000.tar"}


def _epoch_ids(spec: str, epoch: int, accelerator) -> list[int]:
    """The ids one rank sees in `epoch`, from a freshly built dataset and loader."""
    dataset = build_dataset(spec, resolution=8, split="train", seed=SEED)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS)
    else:  # as stage1_tokenizer/train.py: shuffle=True, then accelerate's seedable sampler shards it
        loader = accelerator.prepare(DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                                num_workers=WORKERS, generator=torch.Generator().manual_seed(SEED)))
        loader.set_epoch(epoch)
    return [i for images, _ in loader for i in _ids(images)]


def _run(rank: int, port: int, root: str, specs: dict[str, str]) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # spawn's children default to spawned DataLoader workers (seconds each); torchrun's fork them
    torch.multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=SEED))
        assert accelerator.num_processes == WORLD and accelerator.process_index == rank
        seen = {name: [_epoch_ids(spec, 0, accelerator), _epoch_ids(spec, 0, accelerator),
                       _epoch_ids(spec, 1, accelerator)] for name, spec in specs.items()}
        Path(root, f"rank{rank}.json").write_text(json.dumps(seen))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_disjoint_complete_and_reproducible(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    specs = _make_sources(tmp_path)
    torch.multiprocessing.spawn(_run, args=(_free_port(), str(tmp_path), specs), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name in specs:
        (first0, again0, next0), (first1, again1, next1) = ranks[0][name], ranks[1][name]
        for a, b in ((first0, first1), (next0, next1)):
            assert set(a).isdisjoint(b), name
            assert sorted(a + b) == list(range(N)), name
        assert (first0, first1) == (again0, again1), f"{name}: same seed and epoch, different order"
        assert (first0, first1) != (next0, next1), f"{name}: epoch 1 repeats epoch 0's order"
    assert len(ranks[0]["folder"][0]) == len(ranks[1]["folder"][0]) == N // WORLD
