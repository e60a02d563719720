"""Train the VQGAN tokenizer: one plain Accelerate loop, read top to bottom.

Runs unchanged on CPU, one GPU, or many through `accelerate launch`. Each step: generator
forward/backward over the micro-batches (L1/L2 + LPIPS + quantizer + adaptive-weight GAN), clip,
step; then the discriminator over the same micro-batches once the GAN is on. Checkpoints go
through `accelerator.save_state` into a temporary directory renamed into place, so a killed run
resumes exactly (`resume="auto"`).

Across processes (docs/distributed.md): each process reads its own part of every global batch;
DDP averages the gradients; the adaptive GAN weight, the LeCam EMAs, the VQ usage counts and the
dead-code picks use the global batch; the logged scalars are means over processes. So N processes
with batch B follow one process with batch N*B up to float rounding, except where a statistic is
per process by nature (a BatchNorm discriminator, the quantizer's entropy term, the usage
statistics of the non-VQ quantizers). Only the main process writes logs, images and exports.
"""
from __future__ import annotations

import copy
import itertools
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import data
from common import atomic_write_json, config_to_dict
from common.checkpoint import TrainState, find_checkpoint, save_checkpoint, truncate_metrics, update_ema
from common.distributed import build_accelerator, mean_scalars
from common.schedule import warmup_lr
from common.config import require_positive
from stage1_tokenizer.discriminator import NLayerDiscriminator
from stage1_tokenizer.losses import LossConfig, VQGANLoss
from stage1_tokenizer.model import VQGAN, VQGANConfig
from stage1_tokenizer.reconstruct import reconstruction_metrics, save_comparison_grid


@dataclass
class DataConfig:
    source: str = "synthetic:shapes"
    val_source: str | None = None       # None: the same source's "val" split
    resolution: int | None = None       # None: the model's resolution
    crop: str = "center"                # "center" | "random" (training images only)
    hflip: bool = False                 # random horizontal flips (training images only)
    num_workers: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/tokenizer"
    steps: int = 10000
    batch_size: int = 32                # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    disc_lr: float | None = None        # None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)  # taming's Adam betas for both players
    weight_decay: float = 0.0
    lr_schedule: str = "constant"       # "constant" (taming) or "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1           # cosine floor, as a fraction of lr
    grad_clip: float = 1.0              # 0 = off
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16"
    channels_last: bool = True          # NHWC convolutions: faster on CPUs (oneDNN) and tensor cores
    ema_decay: float = 0.0              # > 0 keeps EMA weights, which are then exported
    seed: int = 0
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_images: int = 512              # held-out images for the final metrics
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r}: expected 'constant' or 'cosine'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}: expected no, fp16 or bf16")
        require_positive(self, "train", ("steps", "batch_size", "grad_accum", "log_every", "image_every",
                                         "checkpoint_every"))


@dataclass
class TokenizerTrainConfig:
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def get_lr(step: int, base_lr: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr_ratio * base_lr."""
    return warmup_lr(step, base_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                     min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.lr_schedule)


def build_datasets(cfg: TokenizerTrainConfig, skip_log: Path | None = None):
    """Training set (with the configured crop/flip) and held-out set (centre crops)."""
    resolution = cfg.data.resolution or cfg.model.resolution
    transform = data.TransformConfig(crop=cfg.data.crop, hflip=cfg.data.hflip)
    train_set = data.build_dataset(cfg.data.source, resolution=resolution, split="train", seed=cfg.train.seed,
                                   transform=transform)
    train_set.skip_log = skip_log  # unreadable files, from every worker and process, end up here
    val_spec = cfg.data.val_source or cfg.data.source
    val_set = data.build_dataset(val_spec, resolution=resolution, split="val" if cfg.data.val_source is None else "train",
                                 seed=cfg.train.seed, shuffle=False)
    return train_set, val_set


def _first_images(dataset, n: int) -> torch.Tensor:
    """The first n images of a map-style or iterable dataset, (n, 3, R, R)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.stack([image for image, _ in itertools.islice(iter(dataset), n)])
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def train(cfg: TokenizerTrainConfig, resume: str | None = None) -> dict:
    """Train a tokenizer as configured; returns the final held-out metrics."""
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    accelerator = build_accelerator(out_dir, mixed_precision=tc.mixed_precision, seed=tc.seed)
    set_seed(tc.seed)
    ckpt = find_checkpoint(out_dir, resume)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
        accelerator.print(json.dumps(config_to_dict(cfg), indent=2))

    # losses first: a missing LPIPS backbone should stop the run before any work is done
    loss_fn = VQGANLoss(cfg.loss).to(accelerator.device)
    model = VQGAN(cfg.model)
    discriminator = NLayerDiscriminator(cfg.model.out_channels, cfg.loss.disc_channels,
                                        cfg.loss.disc_layers, cfg.loss.disc_norm)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    discriminator.to(memory_format=memory_format)
    accelerator.print(f"tokenizer: {model.num_parameters() / 1e6:.2f}M parameters, "
                      f"discriminator: {sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f}M")
    ema = None
    if tc.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)

    fused = accelerator.device.type == "cuda"
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                             betas=tc.betas, weight_decay=tc.weight_decay, fused=fused or None)
    disc_lr = tc.disc_lr if tc.disc_lr is not None else tc.lr
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=disc_lr, betas=tc.betas,
                             weight_decay=tc.weight_decay, fused=fused or None)

    train_set, val_set = build_datasets(cfg, skip_log=out_dir / "skipped")
    model, discriminator, opt_g, opt_d = accelerator.prepare(model, discriminator, opt_g, opt_d)
    stream = data.ResumableLoader(train_set, batch_size=tc.batch_size, accelerator=accelerator,
                                  num_workers=cfg.data.num_workers, seed=tc.seed)
    state = TrainState()
    for obj in (state, stream, loss_fn, ema):  # loss_fn holds the LeCam EMAs
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    raw_model = accelerator.unwrap_model(model)
    raw_disc = accelerator.unwrap_model(discriminator)
    metrics_path = out_dir / "metrics.jsonl"
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} at step {state.step}")
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, state.step)
    elif accelerator.is_main_process:  # a fresh run starts fresh logs
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "skipped", ignore_errors=True)
    accelerator.init_trackers("tokenizer")

    fixed_val = _first_images(val_set, 8).to(accelerator.device)

    progress = tqdm(total=tc.steps, initial=state.step, desc="tokenizer", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    images_seen, t_last = 0, time.perf_counter()
    while state.step < tc.steps:
        step = state.step
        for opt, base in ((opt_g, tc.lr), (opt_d, disc_lr)):
            for group in opt.param_groups:
                group["lr"] = get_lr(step, base, tc)
        gan_on = loss_fn.gan_active(step)

        # ---- generator (tokenizer) step -----------------------------------------------------
        micro_batches, fakes, logs = [], [], {}
        raw_disc.requires_grad_(False)
        for micro in range(tc.grad_accum):
            images = next(stream)[0].contiguous(memory_format=memory_format)
            sync = micro == tc.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    reconstructions, quant = model(images)
                    loss, logs = loss_fn.generator_loss(
                        images, reconstructions, quant.loss, step=step, last_layer=raw_model.last_layer,
                        discriminator=raw_disc if gan_on else None)  # unwrapped: no DDP sync for G's pass
                accelerator.backward(loss / tc.grad_accum)
            logs.update(quant.stats)
            micro_batches.append(images)
            fakes.append(reconstructions.detach())
        if tc.grad_clip > 0:
            logs["grad_norm/generator"] = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw_model, tc.ema_decay)

        # ---- discriminator step -------------------------------------------------------------
        if gan_on:
            raw_disc.requires_grad_(True)
            for micro, (images, fake) in enumerate(zip(micro_batches, fakes)):
                sync = micro == tc.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(discriminator):
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(images, fake, step=step,
                                                                    discriminator=discriminator)
                    accelerator.backward(d_loss / tc.grad_accum)
            logs.update(d_logs)
            if tc.grad_clip > 0:
                logs["grad_norm/discriminator"] = accelerator.clip_grad_norm_(discriminator.parameters(), tc.grad_clip)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

        state.step += 1
        images_seen += tc.batch_size * tc.grad_accum * accelerator.num_processes

        # ---- logging, images, checkpoints ---------------------------------------------------
        scalars = mean_scalars(logs, device=accelerator.device)  # one all-reduce: the global batch's values
        scalars["lr"] = opt_g.param_groups[0]["lr"]
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": state.step, **scalars}) + "\n")
        progress.update(1)
        progress.set_postfix(loss=f"{scalars['loss/total']:.4f}", usage=f"{scalars['quantizer/window_usage']:.2f}")
        if state.step % tc.log_every == 0:
            now = time.perf_counter()
            scalars["throughput/images_per_s"] = images_seen / (now - t_last)
            images_seen, t_last = 0, now
            accelerator.log(scalars, step=state.step)
        if state.step % tc.image_every == 0 and accelerator.is_main_process:
            _save_reconstructions(raw_model, fixed_val, out_dir / "images" / f"step_{state.step:08d}.png")
        if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
            save_checkpoint(accelerator, out_dir, state.step, tc.keep_checkpoints)
    progress.close()

    # ---- export and held-out metrics --------------------------------------------------------
    final_model = ema if ema is not None else raw_model
    results: dict = {}
    if accelerator.is_main_process:
        final_model.save_pretrained(out_dir / "tokenizer")
        _save_reconstructions(final_model, fixed_val, out_dir / "images" / "final.png")
        eval_loader = DataLoader(_limit(val_set, tc.eval_images), batch_size=tc.eval_batch_size)
        results = reconstruction_metrics(final_model, eval_loader, device=accelerator.device)
        skipped = data.read_skip_log(out_dir / "skipped")
        results.update({"step": state.step, "eval_split": val_spec_name(cfg), "eval_images": results["images"],
                        "skipped_files": len(skipped), "num_processes": accelerator.num_processes})
        if skipped:
            accelerator.print(f"{len(skipped)} unreadable training images were skipped; see {out_dir / 'skipped'}")
        atomic_write_json(out_dir / "final_metrics.json", results)
        accelerator.print(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()  # the others wait for the main process's export and evaluation
    accelerator.end_training()
    return results


def _limit(dataset, n: int):
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return list(itertools.islice(iter(dataset), n))
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def val_spec_name(cfg: TokenizerTrainConfig) -> str:
    return f"{cfg.data.val_source} (train split)" if cfg.data.val_source else f"{cfg.data.source} (val split)"


@torch.no_grad()
def _save_reconstructions(model: VQGAN, images: torch.Tensor, path: Path) -> None:
    was_training = model.training
    model.eval()
    save_comparison_grid(images, model.decode(model.encode(images)), path)
    model.train(was_training)
