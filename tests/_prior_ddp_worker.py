"""One process of a multi-process prior training run on CPU (gloo on 127.0.0.1), for the tests.

`run(rank, world_size, port, overrides)` is the target of `torch.multiprocessing.spawn`: it sets
the environment `accelerate launch --cpu` / torchrun would set and calls `train()`. The same file
also runs under the real launcher:

    accelerate launch --cpu --num_processes 2 --main_process_port 29512 tests/_prior_ddp_worker.py KEY=VALUE ...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def run(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    main(overrides)


def main(overrides: list[str]) -> None:
    from common import load_config
    from stage2_prior.train import PriorRunConfig, train

    train(load_config(PriorRunConfig, None, overrides))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, as under pytest
    main(sys.argv[1:])
