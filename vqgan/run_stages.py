"""The stages of `vqgan run`, each a function of the pipeline returning a JSON-able summary."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from common import atomic_write_json, sha256_file
from vqgan.run import Pipeline

SAMPLE_DIR, EVAL_DIR, GRID_DIR = "samples", "eval", "grids"


def _save_png(image: torch.Tensor, path: Path) -> None:
    """image (3, H, W) in [-1, 1]; written under a temporary name first, so a file that exists is whole."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image((image.float().clamp(-1, 1) + 1) / 2, tmp)
    tmp.replace(path)


def stage_tokenizer(p: Pipeline) -> dict:
    from stage1_tokenizer.train import train

    return train(p.cfg.tokenizer, resume="auto")


def stage_encode(p: Pipeline) -> dict:
    from stage1_tokenizer import VQGAN
    from stage1_tokenizer.encode import encode_dataset

    e = p.cfg.encode
    tokenizer = VQGAN.from_pretrained(p.out / "stage1" / "tokenizer", device=p.device)
    manifest = encode_dataset(tokenizer, p.cfg.tokenizer.data.source, p.out / "codes", split=e.split, flip=e.flip,
                              batch_size=e.batch_size, device=p.device, num_workers=e.num_workers)
    return {"items": manifest["total"], "code_shape": manifest["code_shape"], "shards": len(manifest["shards"])}


def _load_pair(p: Pipeline):
    from stage2_prior.images import load_pair

    return load_pair(p.out / "stage2" / "prior", p.out / "stage1" / "tokenizer", device=p.device)


def stage_prior(p: Pipeline) -> dict:
    from stage2_prior.train import train

    return train(p.cfg.prior, resume="auto")


def _batch_labels(num_classes: int, start: int, count: int) -> torch.Tensor | None:
    """Class-balanced labels: sample i is of class i % num_classes."""
    return None if num_classes == 0 else torch.arange(start, start + count) % num_classes


def stage_sample(p: Pipeline) -> dict:
    """num_samples PNGs in OUT/samples, batch by batch; a batch is reseeded from its index, so a
    resumed run skips whole batches already written and draws the very same images afterwards."""
    from stage2_prior import generate
    from stage2_prior.images import decoding_record

    e = p.cfg.eval
    prior, tokenizer = _load_pair(p)
    out = p.out / SAMPLE_DIR
    out.mkdir(parents=True, exist_ok=True)
    # finished batches are only reused when they came from this very prior and these settings
    origin = {"prior_sha256": sha256_file(p.out / "stage2" / "prior" / "model.safetensors"),
              "settings": p.settings["sample"]}
    origin_file = out / "origin.json"
    if not origin_file.is_file() or json.loads(origin_file.read_text()) != origin:
        for stale in out.glob("*.png"):
            stale.unlink()
        atomic_write_json(origin_file, origin)
    num_classes = prior.config.num_classes
    batches = math.ceil(e.num_samples / e.sample_batch_size)
    for b in tqdm(range(batches), desc="sample", unit="batch"):
        start = b * e.sample_batch_size
        count = min(e.sample_batch_size, e.num_samples - start)
        if (out / f"{start + count - 1:06d}.png").is_file():  # the batch's last file is written last
            continue
        labels = _batch_labels(num_classes, start, count)
        codes = generate(prior, count if labels is None else None,
                         labels=None if labels is None else labels.to(p.device),
                         cfg_scale=e.cfg_scale if num_classes else 1.0, temperature=e.temperature, top_k=e.top_k,
                         top_p=e.top_p, seed=e.seed * 1_000_003 + b, **_decoding(e))
        for i, image in enumerate(tokenizer.decode(codes).cpu()):
            _save_png(image, out / f"{start + i:06d}.png")
    # the report's grid: one row of grid_per_class samples per class (first 10 classes)
    rows = min(num_classes, 10) if num_classes else 4
    labels = torch.arange(rows).repeat_interleave(e.grid_per_class) if num_classes else None
    codes = generate(prior, rows * e.grid_per_class if labels is None else None,
                     labels=None if labels is None else labels.to(p.device),
                     cfg_scale=e.cfg_scale if num_classes else 1.0, temperature=e.temperature, top_k=e.top_k,
                     top_p=e.top_p, seed=e.seed + 7, **_decoding(e))
    grid = make_grid((tokenizer.decode(codes).float().cpu().clamp(-1, 1) + 1) / 2, nrow=e.grid_per_class, padding=2,
                     pad_value=1.0)
    (p.out / GRID_DIR).mkdir(parents=True, exist_ok=True)
    save_image(grid, p.out / GRID_DIR / "samples_per_class.png")
    return {"samples": e.num_samples, "dir": str(out), "num_classes": num_classes,
            "cfg_scale": e.cfg_scale if num_classes else 1.0, "temperature": e.temperature, "top_k": e.top_k,
            "top_p": e.top_p, "seed": e.seed, **decoding_record(prior, e.decode_steps, e.choice_temperature),
            "grid": f"{GRID_DIR}/samples_per_class.png"}


def _decoding(e) -> dict:
    """A masked prior's decoding options, when set in the eval config (None = the sampler's defaults)."""
    return {k: v for k, v in (("steps", e.decode_steps), ("choice_temperature", e.choice_temperature))
            if v is not None}


def _fidelity_options(p: Pipeline) -> dict:
    e = p.cfg.eval
    return dict(inception_weights=e.inception_weights or None, batch_size=e.metric_batch_size, device=p.device,
                cache_dir=str(p.out / EVAL_DIR / "fidelity-cache"))


def _reference(p: Pipeline):
    """The real images FID compares with: the first reference_count of the source's reference split."""
    from eval.fidelity import as_fidelity_input

    e = p.cfg.eval
    return as_fidelity_input(p.cfg.tokenizer.data.source, resolution=p.cfg.tokenizer.model.resolution,
                             split=e.reference_split, limit=e.reference_count)


def _reference_cache_name(p: Pipeline) -> str:
    from eval.fidelity import reference_cache_name

    e = p.cfg.eval
    return reference_cache_name(p.cfg.tokenizer.data.source, e.reference_split, p.cfg.tokenizer.model.resolution,
                                e.reference_count, e.inception_weights or None)


def _try_fidelity(fn: Callable[[], dict]) -> dict:
    """FID-type metrics, or the reason they could not be had (no Inception weights here)."""
    from eval.fidelity import InceptionWeightsUnavailable

    try:
        return fn()
    except InceptionWeightsUnavailable as e:
        print(f"[vqgan run] FID/KID/PR skipped: {e}", flush=True)
        return {"skipped": str(e)}


def stage_eval_tokenizer(p: Pipeline) -> dict:
    from eval.fidelity import compute_metrics
    from eval.tokenizer_eval import evaluate_tokenizer
    from stage1_tokenizer import VQGAN

    e = p.cfg.eval
    tokenizer = VQGAN.from_pretrained(p.out / "stage1" / "tokenizer", device=p.device)
    out = p.out / EVAL_DIR / "tokenizer"
    results = evaluate_tokenizer(tokenizer, p.cfg.tokenizer.data.source, out, split=e.reference_split,
                                 limit=e.reference_count, batch_size=e.metric_batch_size, device=p.device,
                                 lpips_weights=e.lpips_weights or None)
    (p.out / GRID_DIR).mkdir(parents=True, exist_ok=True)
    (p.out / GRID_DIR / "reconstructions.png").write_bytes((out / "grid.png").read_bytes())
    # the held-out images are the first reference_count of the reference split: the very set the
    # samples are scored against, so its Inception features are computed once and cached for both
    rfid = _try_fidelity(lambda: compute_metrics(results["recon_dir"], _reference(p), fid=True, kid=False, prc=False,
                                                 input2_cache_name=_reference_cache_name(p), **_fidelity_options(p)))
    results["rfid"] = rfid.get("fid")
    if "skipped" in rfid:
        results["rfid_skipped"] = rfid["skipped"]
    results["grid"] = f"{GRID_DIR}/reconstructions.png"
    atomic_write_json(out / "metrics.json", results)
    return results


def _on_class_accuracy(p: Pipeline, num_classes: int) -> dict:
    from eval.classifier import ClassifierConfig, accuracy, load_or_train_classifier, predict
    from data import ImageFolderDataset

    e, resolution = p.cfg.eval, p.cfg.tokenizer.model.resolution
    source = p.cfg.tokenizer.data.source
    classifier = load_or_train_classifier(ClassifierConfig(source=source, resolution=resolution,
                                                           num_classes=num_classes, steps=e.classifier_steps),
                                          p.out / EVAL_DIR / "classifier")
    samples = ImageFolderDataset(p.out / SAMPLE_DIR, resolution=resolution, split="train", val_fraction=0.0)
    hits = 0
    for start in range(0, len(samples), 256):
        idx = range(start, min(start + 256, len(samples)))
        images = torch.stack([samples[i][0] for i in idx])
        hits += (predict(classifier, images) == _batch_labels(num_classes, start, len(idx))).sum().item()
    return {"on_class_accuracy": hits / len(samples),
            "classifier_real_accuracy": accuracy(classifier, source, resolution, split=e.reference_split)}


def stage_eval_samples(p: Pipeline) -> dict:
    from eval.fidelity import compute_metrics

    e = p.cfg.eval
    source = p.cfg.tokenizer.data.source
    results = _try_fidelity(lambda: compute_metrics(
        str(p.out / SAMPLE_DIR), _reference(p), fid=True, kid=True, prc=True, isc=True,
        input2_cache_name=_reference_cache_name(p), **_fidelity_options(p)))
    num_classes = json.loads((p.out / "stage2" / "prior" / "config.json").read_text())["config"]["num_classes"]
    if num_classes and e.on_class:
        results.update(_on_class_accuracy(p, num_classes))
    results.update(reference={"source": source, "split": e.reference_split, "count": e.reference_count},
                   num_samples=e.num_samples)
    atomic_write_json(p.out / EVAL_DIR / "samples.json", results)
    return results


def stage_report(p: Pipeline, config_path: str | None) -> dict:
    from vqgan.report import write_report

    return write_report(p, config_path)


def build_stages(p: Pipeline, config_path: str | None) -> dict[str, Callable[[], dict]]:
    return {
        "tokenizer": lambda: stage_tokenizer(p),
        "encode": lambda: stage_encode(p),
        "prior": lambda: stage_prior(p),
        "sample": lambda: stage_sample(p),
        "eval_tokenizer": lambda: stage_eval_tokenizer(p),
        "eval_samples": lambda: stage_eval_samples(p),
        "report": lambda: stage_report(p, config_path),
    }
