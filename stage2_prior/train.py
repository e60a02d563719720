"""Train a stage-2 prior on pre-encoded code shards: one plain Accelerate loop, read top to bottom.

Runs unchanged on CPU, one GPU, or many GPUs/nodes through `accelerate launch`. Each step: set
the learning rate (warm-up + cosine), forward/backward over the micro-batches, clip, AdamW step,
EMA update; then log, draw a sample grid, checkpoint. Checkpoints go through
`accelerator.save_state` into a temporary directory renamed into place, so a killed run resumes
exactly (`resume="auto"`). Stage 1 is used only through its public API, to check that the
shards came from the configured tokenizer and to decode sample grids.

Batches across processes: Accelerate's default `split_batches=False` gives every process its own
`batch_size` items, and its seeded sampler hands process p the p-th of each run of
`num_processes` consecutive batches of the one permutation. So the global batch of a step is a
contiguous chunk of that permutation, the same items as one process with
`batch_size * num_processes` (drop_last: both drop the same incomplete tail each epoch; the flip
variant depends only on (seed, epoch, index)). DDP averages the gradients of equal-sized
per-process means, so N processes follow one process's loss curve up to float rounding.
"""
from __future__ import annotations

import copy
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from common import ConfigError, atomic_write_bytes, atomic_write_json, config_to_dict
from common.checkpoint import TrainState, find_checkpoint, save_checkpoint, truncate_metrics, update_ema
from common.distributed import build_accelerator
from common.schedule import warmup_lr
from common.config import require_positive
from data import ResumableLoader
from data.codes import CodeDataset
from stage1_tokenizer import VQGAN
from stage2_prior.load import build_prior
from stage2_prior.model import CodePrior, PriorConfig
from stage2_prior.sample import generate

SAMPLE_COLUMNS = 8
SAMPLE_MAX_CLASSES = 10
UNCONDITIONAL_SAMPLE_ROWS = 4


@dataclass
class PriorDataConfig:
    codes: str = "runs/tiny/codes"                  # directory written by `vqgan encode`
    tokenizer: str = "runs/tiny/stage1/tokenizer"   # checks the shards' tokenizer hash and decodes sample grids;
                                                    # "" = skip both
    variant: str = "random"                         # stored flip variant: random | original | flipped
    conditional: bool = True                        # class-conditional (needs labelled shards); false = unconditional
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.variant not in ("random", "original", "flipped"):
            raise ValueError(f"data.variant={self.variant!r}: expected random, original or flipped")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class PriorTrainConfig:
    out_dir: str = "runs/prior"
    steps: int = 5000
    batch_size: int = 32                 # per process and micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05           # AdamW, decayed on matrices only (nanoGPT)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1            # cosine floor, as a fraction of lr
    grad_clip: float = 1.0               # 0 = off (the norm is still logged)
    mixed_precision: str = "no"          # no | fp16 | bf16
    ema_decay: float = 0.0               # > 0 keeps EMA weights, which are then exported
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500              # decoded sample grid (needs data.tokenizer)
    sample_cfg_scale: float = 2.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    peak_flops: float = 0.0              # per device, for MFU; 0 = guess (312e12 on CUDA, else 1e12)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}: expected no, fp16 or bf16")
        require_positive(self, "train", ("steps", "batch_size", "grad_accum", "log_every", "sample_every",
                                         "checkpoint_every"))
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class PriorRunConfig:
    # vocab_sizes, code_shape and num_classes are filled from the shards' manifest (see resolve_model_config)
    model: PriorConfig = field(default_factory=PriorConfig)
    data: PriorDataConfig = field(default_factory=PriorDataConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


def get_lr(step: int, cfg: PriorTrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to min_lr_ratio * lr at cfg.steps (nanoGPT)."""
    return warmup_lr(step, cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                     min_lr_ratio=cfg.min_lr_ratio)


def build_optimizer(model: torch.nn.Module, cfg: PriorTrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only, as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def resolve_model_config(cfg: PriorRunConfig, dataset: CodeDataset) -> PriorConfig:
    """The model config with vocab_sizes, code_shape and num_classes taken from the shards."""
    if cfg.data.conditional and not dataset.num_classes:
        raise ConfigError(f"{dataset.directory} holds unlabelled codes (no classes in its manifest), so it cannot "
                          f"train a class-conditional prior; set data.conditional=false for an unconditional one")
    return replace(cfg.model, vocab_sizes=tuple(dataset.vocab_sizes), code_shape=tuple(dataset.code_shape),
                   num_classes=dataset.num_classes if cfg.data.conditional else 0)


def train(cfg: PriorRunConfig, resume: str | None = None) -> dict:
    """Train a prior as configured; returns the final stats (loss, bits/token, steps, tokens/s)."""
    tc, dc = cfg.train, cfg.data
    out_dir = Path(tc.out_dir)
    # batch_size is per process (see the module docstring); gloo when launched on CPU-only machines
    accelerator = build_accelerator(out_dir, mixed_precision=tc.mixed_precision, seed=tc.seed)
    set_seed(tc.seed)  # the same initial weights on every process
    ckpt = find_checkpoint(out_dir, resume)

    # data first: shards made by another tokenizer stop the run before any work is done
    tokenizer = VQGAN.from_pretrained(dc.tokenizer) if dc.tokenizer else None
    dataset = CodeDataset(dc.codes, tokenizer_hash=tokenizer.content_hash() if tokenizer is not None else None,
                          variant=dc.variant, seed=tc.seed)
    cfg = replace(cfg, model=resolve_model_config(cfg, dataset))
    conditional = cfg.model.num_classes > 0
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
        accelerator.print(json.dumps(config_to_dict(cfg), indent=2))
    if tokenizer is not None:  # only the main process draws sample grids
        tokenizer = tokenizer.to(accelerator.device).eval() if accelerator.is_main_process else None

    model = build_prior(cfg.model)
    accelerator.print(f"{cfg.model.prior_type} prior: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.seq_len} tokens per item, "
                      f"{len(dataset)} items in {dc.codes}")
    ema = None
    if tc.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
    optimizer = build_optimizer(model, tc, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = ResumableLoader(dataset, batch_size=tc.batch_size, accelerator=accelerator,
                             num_workers=dc.num_workers, seed=tc.seed)
    state = TrainState()
    for obj in (state, stream, ema):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)
    # each process its own dropout / label-dropout draws from here on (restored per process on resume)
    set_seed(tc.seed, device_specific=True)

    raw_model = accelerator.unwrap_model(model)
    metrics_path = out_dir / "metrics.jsonl"
    last: dict = {}
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} at step {state.step}")
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, state.step)
            lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
            last = json.loads(lines[-1]) if lines else {}
    elif accelerator.is_main_process:  # a fresh run starts fresh logs
        metrics_path.unlink(missing_ok=True)
    accelerator.init_trackers("prior")

    tokens_per_step = tc.batch_size * tc.grad_accum * accelerator.num_processes * cfg.model.seq_len
    peak_flops = tc.peak_flops or (312e12 if accelerator.device.type == "cuda" else 1e12)
    progress = tqdm(total=tc.steps, initial=state.step, desc="prior", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    steps_run, t_start = 0, time.perf_counter()
    window_steps, t_last = 0, t_start
    while state.step < tc.steps:
        lr = get_lr(state.step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- forward/backward over the micro-batches, clip, step ----------------------------------
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(tc.grad_accum):
            codes, labels = next(stream)
            sync = micro == tc.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    _, loss = model(codes, labels if conditional else None)
                accelerator.backward(loss / tc.grad_accum)
            loss_sum += loss.detach().float()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, raw_model, tc.ema_decay)
        state.step += 1
        steps_run += 1
        window_steps += 1

        # ---- logging, samples, checkpoints --------------------------------------------------------
        loss_value = accelerator.reduce(loss_sum / tc.grad_accum, reduction="mean").item()  # over all processes
        last = {"step": state.step, "loss": loss_value, "bits_per_token": loss_value / math.log(2), "lr": lr,
                "grad_norm": float(grad_norm)}
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if state.step % tc.log_every == 0:
            now = time.perf_counter()
            tokens_per_s = window_steps * tokens_per_step / (now - t_last)
            window_steps, t_last = 0, now
            scalars = {k: v for k, v in last.items() if k != "step"}
            scalars["throughput/tokens_per_s"] = tokens_per_s
            scalars["throughput/mfu"] = raw_model.estimate_mfu(tokens_per_s / accelerator.num_processes, peak_flops)
            accelerator.log(scalars, step=state.step)
        if tokenizer is not None and state.step % tc.sample_every == 0:
            save_sample_grid(ema if ema is not None else raw_model, tokenizer,
                             out_dir / "samples" / f"step_{state.step:08d}.png", num_classes=cfg.model.num_classes,
                             cfg_scale=tc.sample_cfg_scale,
                             seed=tc.seed, autocast=accelerator.autocast)
        if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
            save_checkpoint(accelerator, out_dir, state.step, tc.keep_checkpoints)
    progress.close()
    elapsed = time.perf_counter() - t_start

    # ---- export -----------------------------------------------------------------------------------
    final_model = ema if ema is not None else raw_model
    stats = {"steps": state.step, "loss": last.get("loss"), "bits_per_token": last.get("bits_per_token"),
             "tokens_per_s": steps_run * tokens_per_step / elapsed if steps_run else None,
             "tokens_seen": state.step * tokens_per_step, "parameters": raw_model.num_parameters(),
             "exported": "ema" if ema is not None else "raw", "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        names = dataset.class_names
        final_model.class_names = list(names) if conditional and names and len(names) == cfg.model.num_classes else None
        final_model.save_pretrained(out_dir / "prior", tokenizer_hash=dataset.tokenizer_hash,
                                    tokenizer_config=dataset.tokenizer_config)
        if tokenizer is not None:
            last_grid = out_dir / "samples" / f"step_{state.step:08d}.png"
            if steps_run and state.step % tc.sample_every == 0:  # drawn from this very model a moment ago
                atomic_write_bytes(out_dir / "samples" / "final.png", last_grid.read_bytes())
            else:
                save_sample_grid(final_model, tokenizer, out_dir / "samples" / "final.png",
                                 num_classes=cfg.model.num_classes, cfg_scale=tc.sample_cfg_scale,
                                 seed=tc.seed, autocast=accelerator.autocast)
        atomic_write_json(out_dir / "final_stats.json", stats)
        accelerator.print(json.dumps(stats, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return stats


@torch.no_grad()
def save_sample_grid(prior: CodePrior, tokenizer: VQGAN, path: Path, *, num_classes: int, cfg_scale: float,
                     seed: int, autocast=nullcontext) -> None:
    """Sample codes with a fixed seed and save them decoded as a PNG grid: one row per class (the
    first 10), or 4 rows unconditionally. The global RNG state is left untouched."""
    device = next(prior.parameters()).device
    if num_classes > 0:
        labels = torch.arange(min(num_classes, SAMPLE_MAX_CLASSES), device=device).repeat_interleave(SAMPLE_COLUMNS)
        n = None
    else:
        labels, n, cfg_scale = None, UNCONDITIONAL_SAMPLE_ROWS * SAMPLE_COLUMNS, 1.0
    was_training = prior.training
    prior.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            codes = generate(prior, n, labels=labels, cfg_scale=cfg_scale, seed=seed)
    finally:
        prior.train(was_training)
    images = tokenizer.decode(codes.to(next(tokenizer.parameters()).device)).float()
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=SAMPLE_COLUMNS, padding=1)
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
