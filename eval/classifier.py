"""A small image classifier trained on real images, used to check that generated samples are of
the class that was asked for ("on-class accuracy"), as a cheap stand-in for a human judge.

It is trained once per (data source, resolution, seed) and cached as safetensors + JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import data
from common import atomic_dir


@dataclass
class ClassifierConfig:
    source: str = "synthetic:shapes"
    resolution: int = 32
    num_classes: int = 10
    width: int = 16
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU x2, max-pool) and a linear head; ~75k params at width 16."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for mult in (1, 2, 4):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width * mult, 3, padding=1), nn.BatchNorm2d(width * mult), nn.ReLU()]
                channels = width * mult
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images).mean(dim=(2, 3)))


def train_classifier(config: ClassifierConfig, progress: bool = True) -> SmallCNN:
    """Train on the source's train split with random flips; returns the model in eval mode."""
    torch.manual_seed(config.seed)
    dataset = data.build_dataset(config.source, resolution=config.resolution, split="train", seed=config.seed,
                                 transform=data.TransformConfig(hflip=True), require_labels=True)
    model = SmallCNN(config.num_classes, config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps)
    stream = data.ResumableLoader(dataset, batch_size=min(config.batch_size, len(dataset)), seed=config.seed)
    model.train()
    for _ in tqdm(range(config.steps), desc="classifier", disable=not progress):
        images, labels = next(stream)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_or_train_classifier(config: ClassifierConfig, cache_dir: str | Path | None = None,
                             progress: bool = True) -> SmallCNN:
    """The cached classifier for this config, trained (and cached) if absent."""
    cache = Path(cache_dir) if cache_dir else None
    if cache is not None and (cache / "config.json").is_file():
        saved = json.loads((cache / "config.json").read_text())
        if saved == asdict(config):
            model = SmallCNN(config.num_classes, config.width)
            model.load_state_dict(load_file(str(cache / "model.safetensors")), strict=True)
            return model.eval()
    model = train_classifier(config, progress=progress)
    if cache is not None:
        with atomic_dir(cache) as tmp:
            (tmp / "config.json").write_text(json.dumps(asdict(config), indent=2))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return model


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """images (N, 3, H, W) in [-1, 1] -> predicted class ids (N,)."""
    return torch.cat([model(chunk).argmax(-1) for chunk in images.split(batch_size)])


def accuracy(model: SmallCNN, spec: str, resolution: int, split: str = "val", limit: int = 1000) -> float:
    """Accuracy on up to `limit` held-out images of a source."""
    dataset = data.build_dataset(spec, resolution=resolution, split=split, shuffle=False)
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=256):
        correct += (predict(model, images) == labels).sum().item()
        total += len(labels)
        if total >= limit:
            break
    return correct / total
