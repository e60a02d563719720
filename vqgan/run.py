"""`vqgan run`: the whole pipeline in one resumable command.

    tokenizer -> encode -> prior -> sample -> eval_tokenizer -> eval_samples -> report

Every stage writes OUT/stages/NAME.json (atomically) when it finishes, with its wall time and a
hash of the settings it ran with; a rerun skips finished stages, and the training stages resume
from their newest checkpoint, so a killed run loses at most one checkpoint interval. A finished
stage whose settings changed is an error rather than a silent reuse.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from common import ConfigError, atomic_write_json, config_to_dict, load_config
from common.config import require_positive
from stage1_tokenizer.train import TokenizerTrainConfig
from stage2_prior.train import PriorRunConfig

from vqgan import RUN_STAGES as STAGES


@dataclass
class EncodeConfig:
    split: str = "train"
    flip: bool = True               # also encode the mirrored image: twice the data for the prior
    batch_size: int = 256
    num_workers: int = 0


@dataclass
class EvalConfig:
    num_samples: int = 1000         # generated images for FID/KID/precision-recall, class-balanced
    cfg_scale: float = 2.0          # classifier-free guidance (conditional priors)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    decode_steps: int | None = None         # masked priors: parallel decoding passes (None = 8)
    choice_temperature: float | None = None  # masked priors: confidence noise (None = 4.5)
    seed: int = 0
    sample_batch_size: int = 100
    reference_split: str = "val"    # real images FID compares against (and the tokenizer is scored on)
    reference_count: int = 1000
    grid_per_class: int = 8         # samples per class in the report's grid
    metric_batch_size: int = 64
    inception_weights: str = ""     # "" = $VQGAN_INCEPTION_WEIGHTS, else torch-fidelity downloads them
    lpips_weights: str = ""         # "" = $VQGAN_LPIPS_VGG, else torchvision downloads the VGG16
    on_class: bool = True           # conditional priors: score samples with a small classifier
    classifier_steps: int = 300

    def __post_init__(self) -> None:
        require_positive(self, "eval", ("num_samples", "sample_batch_size", "reference_count", "metric_batch_size"))


@dataclass
class RunConfig:
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    prior: PriorRunConfig = field(default_factory=PriorRunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_run_config(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A preset's sections, with overrides `SECTION.key=value`, and every path placed under `out`."""
    by_section: dict[str, list[str]] = {name: [] for name in ("tokenizer", "encode", "prior", "eval")}
    for item in overrides or []:
        section, _, rest = item.partition(".")
        if section not in by_section or not rest:
            raise ConfigError(f"override {item!r}: vqgan run overrides start with a section, one of "
                              f"{sorted(by_section)}, e.g. tokenizer.train.steps=100 or eval.num_samples=200")
        by_section[section].append(rest)
    import yaml  # the optional sections default when a preset leaves them out

    present = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    sections = {}
    for name, cls in (("tokenizer", TokenizerTrainConfig), ("encode", EncodeConfig), ("prior", PriorRunConfig),
                      ("eval", EvalConfig)):
        required = name in ("tokenizer", "prior")
        if required or (isinstance(present, dict) and name in present):
            sections[name] = load_config(cls, path, by_section[name], section=name)
        else:
            sections[name] = load_config(cls, None, by_section[name])
    out = Path(out)
    tok, prior = sections["tokenizer"], sections["prior"]
    tok = replace(tok, train=replace(tok.train, out_dir=str(out / "stage1")))
    prior = replace(prior, data=replace(prior.data, codes=str(out / "codes"), tokenizer=str(out / "stage1" / "tokenizer")),
                    train=replace(prior.train, out_dir=str(out / "stage2")))
    return RunConfig(tokenizer=tok, encode=sections["encode"], prior=prior, eval=sections["eval"])


# options added after runs were made, with their defaults: left out of the hash while they hold them,
# so a run made before them keeps its stages
LATER_DEFAULTS = {"mask_schedule": "cosine", "decode_steps": None, "choice_temperature": None}


def _without_later_defaults(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_later_defaults(v) for k, v in value.items()
                if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return value


def _settings_hash(*parts: object) -> str:
    text = json.dumps([_without_later_defaults(config_to_dict(p)) if hasattr(p, "__dataclass_fields__") else p
                       for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, cfg: RunConfig, out: str | Path, device: str | None = None, force: tuple[str, ...] = ()):
        import torch

        self.cfg, self.out = cfg, Path(out)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ConfigError(f"--force {unknown}: unknown stage(s); stages are {list(STAGES)}")
        self.force = set(force)
        self.stage_dir = self.out / "stages"
        # what each stage depends on: a change upstream invalidates it too
        c = cfg
        self.settings = {
            "tokenizer": _settings_hash(c.tokenizer),
            "encode": _settings_hash(c.tokenizer, c.encode),
            "prior": _settings_hash(c.tokenizer, c.encode, c.prior),
            "sample": _settings_hash(c.tokenizer, c.encode, c.prior, self._sample_settings()),
            "eval_tokenizer": _settings_hash(c.tokenizer, c.eval.reference_split, c.eval.reference_count),
            "eval_samples": _settings_hash(c.tokenizer, c.encode, c.prior, c.eval),
            "report": _settings_hash(c.tokenizer, c.encode, c.prior, c.eval),
        }

    def _sample_settings(self) -> dict:
        e = self.cfg.eval
        settings = {k: getattr(e, k) for k in ("num_samples", "cfg_scale", "temperature", "top_k", "top_p", "seed",
                                               "sample_batch_size")}
        return {**settings, **{k: getattr(e, k) for k in ("decode_steps", "choice_temperature")
                               if getattr(e, k) is not None}}

    # ---- stage bookkeeping ---------------------------------------------------------------------
    def record(self, name: str) -> dict | None:
        path = self.stage_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, stages: dict[str, Callable[[], dict]]) -> dict[str, dict]:
        records = {}
        for name in STAGES:
            done = self.record(name)
            if done is not None and name not in self.force:
                if done.get("settings") != self.settings[name]:
                    raise ConfigError(f"{self.out}: stage {name!r} finished earlier with other settings; "
                                      f"use a new --out, or --force {name} to redo it (and what follows)")
                print(f"[vqgan run] {name}: done earlier ({done['seconds']:.0f} s), skipped", flush=True)
                records[name] = done
                continue
            self.force.update(STAGES[STAGES.index(name):])  # redoing a stage redoes what depends on it
            print(f"[vqgan run] {name}: starting", flush=True)
            start = time.perf_counter()
            result = stages[name]()
            done = {"stage": name, "seconds": time.perf_counter() - start, "settings": self.settings[name],
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result}
            atomic_write_json(self.stage_dir / f"{name}.json", done)
            print(f"[vqgan run] {name}: finished in {done['seconds']:.0f} s", flush=True)
            records[name] = done
        return records


def run_pipeline(cfg: RunConfig, out: str | Path, *, device: str | None = None, force: tuple[str, ...] = (),
                 config_path: str | None = None) -> dict:
    """Run (or resume) every stage; returns the report dict (also OUT/report.json, OUT/report.md)."""
    from vqgan import run_stages

    pipeline = Pipeline(cfg, out, device=device, force=force)
    stages = run_stages.build_stages(pipeline, config_path)
    pipeline.run(stages)
    return json.loads((Path(out) / "report.json").read_text())
