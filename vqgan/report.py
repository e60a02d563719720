"""The benchmark report of `vqgan run`: OUT/report.json (everything, machine-readable) and
OUT/report.md (tables and the image grids), with configs, seeds, sample counts, wall time per
stage and library versions, so a number can always be traced to what produced it."""
from __future__ import annotations

import platform
import sys
import time
from importlib import metadata

import torch

from common import atomic_write_json, atomic_write_text, config_to_dict
from vqgan.run import STAGES, Pipeline

LIBRARIES = ("vqgan-toolkit", "torch", "torchvision", "torch-fidelity", "x-transformers", "accelerate", "datasets",
             "webdataset", "lpips", "torchmetrics", "safetensors", "numpy")


def library_versions() -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def render_markdown(report: dict) -> str:
    tok, prior, samples = report["tokenizer"], report["prior"], report["samples"]
    lines = [f"# vqgan run report: {report['out']}", "",
             f"Config `{report['config_path']}`, device `{report['device']}`, written {report['written']}.", "",
             "## Tokenizer (held-out reconstructions)", "",
             "| images | PSNR dB | SSIM | LPIPS | rFID | codebook usage | perplexity |", "|---|---|---|---|---|---|---|",
             f"| {tok.get('images')} | {_fmt(tok.get('psnr'), 2)} | {_fmt(tok.get('ssim'))} | {_fmt(tok.get('lpips'))} "
             f"| {_fmt(tok.get('rfid'), 2)} | {_percent(tok.get('codebook_usage'))} "
             f"({tok.get('codes_used')}/{tok.get('codebook_size')}) | {_fmt(tok.get('perplexity'), 1)} |", ""]
    for key in ("lpips_skipped", "rfid_skipped"):
        if tok.get(key):
            lines += [f"*{key.split('_')[0].upper()} not computed:* {tok[key]}", ""]
    prior_type = report["sampling"].get("prior_type", "ar")
    decoding = (f"masked prior, {report['sampling']['steps']} decoding steps" if prior_type == "masked"
                else "autoregressive prior")
    lines += [f"![real (top) and reconstructed (bottom)]({tok.get('grid')})", "",
              "## Prior", "", f"{decoding[0].upper()}{decoding[1:]}.", "",
              "| parameters | steps | tokens seen | final loss | bits/token | training tokens/s |",
              "|---|---|---|---|---|---|",
              f"| {_fmt(prior.get('parameters'))} | {prior.get('steps')} | {_fmt(prior.get('tokens_seen'))} "
              f"| {_fmt(prior.get('loss'))} | {_fmt(prior.get('bits_per_token'))} | {_fmt(prior.get('tokens_per_s'), 0)} |",
              "", "## Samples", "",
              f"{samples.get('num_samples')} samples (guidance {report['sampling']['cfg_scale']}, temperature "
              f"{report['sampling'].get('temperature')}, top-k {report['sampling'].get('top_k')}, top-p "
              f"{report['sampling'].get('top_p')}, seed {report['sampling']['seed']}) against {samples['reference']['count']} real images of "
              f"`{samples['reference']['source']}` ({samples['reference']['split']} split).", "",
              "| FID | KID (x1e3) | precision | recall | IS | on-class accuracy |", "|---|---|---|---|---|---|"]
    kid = samples.get("kid_mean")
    is_text = _fmt(samples.get("is_mean"), 2) if samples.get("is_mean") is not None else "n/a"
    lines += [f"| {_fmt(samples.get('fid'), 2)} | {_fmt(None if kid is None else 1e3 * kid, 2)} "
              f"| {_fmt(samples.get('precision'))} | {_fmt(samples.get('recall'))} | {is_text} "
              f"| {_percent(samples.get('on_class_accuracy'))} |", ""]
    if samples.get("skipped"):
        lines += [f"*FID/KID/precision/recall not computed:* {samples['skipped']}", ""]
    if samples.get("is_reason"):
        lines += [f"*{samples['is_reason']}*", ""]
    if samples.get("classifier_real_accuracy") is not None:
        lines += [f"On-class accuracy: a small CNN trained on the real images labels each sample; it scores "
                  f"{_percent(samples['classifier_real_accuracy'])} on held-out real images.", ""]
    lines += [f"![samples, one row per class]({report['sampling']['grid']})", "", "## Time per stage", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {_fmt(report['stages'][name], 0)} |" for name in report["stages"]]
    lines += [f"| **total** | **{report['total_seconds']:.0f}** |", "", "## Versions", "",
              "| library | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["versions"].items()]
    lines += ["", f"Machine: {report['machine']['platform']}, {report['machine']['processor']}, "
              f"{report['machine']['torch_threads']} torch threads"
              + (f", {report['machine']['cuda_device']}" if "cuda_device" in report["machine"] else "") + ".", ""]
    return "\n".join(lines)


def write_report(p: Pipeline, config_path: str | None) -> dict:
    records = {name: p.record(name) for name in STAGES if name != "report"}
    missing = [name for name, r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"report: stage(s) {missing} have not finished under {p.out}")
    stage_seconds = {name: r["seconds"] for name, r in records.items()}
    sample = records["sample"]["result"]
    report = {
        "out": str(p.out), "config_path": config_path, "device": p.device,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": config_to_dict(p.cfg),
        "tokenizer": records["eval_tokenizer"]["result"] | {"training": records["tokenizer"]["result"]},
        "prior": records["prior"]["result"],
        "sampling": {k: sample.get(k) for k in ("samples", "cfg_scale", "temperature", "top_k", "top_p", "seed",
                                                "num_classes", "grid", "prior_type", "steps", "choice_temperature")
                     if k in sample},
        "samples": records["eval_samples"]["result"],
        "stages": stage_seconds, "total_seconds": sum(stage_seconds.values()),
        "versions": library_versions(), "machine": machine(),
    }
    atomic_write_json(p.out / "report.json", report)
    atomic_write_text(p.out / "report.md", render_markdown(report))
    print(render_markdown(report))
    return {"report": str(p.out / "report.md")}
