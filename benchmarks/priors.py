"""Autoregressive (GPTPrior, KV cache) vs masked (MaskedPrior, MaskGIT) priors: quality and speed.

    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
    VQGAN_INCEPTION_WEIGHTS=../shared/assets/inception/weights-inception-2015-12-05-fid-only.pth \
        python benchmarks/priors.py [--datasets embedded cifar] [--steps 1200] [--out runs/bench-priors]
    MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 \
        python benchmarks/priors.py --no-quality --speed [--sizes tiny small gpt-b] [--speed-batches 1 4] [--repeats 3]

A. Quality at equal parameters and training steps (per `--datasets`; relative paths are taken from
   the repository root). An AR and a masked prior train with the tiny preset's prior settings
   (configs/tiny.yaml: dim 128, depth 4, heads 4, batch 64, lr 3e-3, bf16) for `--steps` steps through
   `vqgan train-prior` into OUT/DATASET/{ar,masked}; a finished run with the same config is reused, an
   unfinished one resumes (`--resume auto`), one with another config stops the script (remove it).
   Their parameter counts differ by the [MASK] embedding row.
   Each decoding (AR: KV cache, one token per forward pass; masked: T = `--masked-steps` passes) then
   gets, with the same guidance, temperature and seed:
     * small-sample FID of `--fid-samples` balanced samples against as many real images (the embedded
       source's val split / the CIFAR test file; the on-class samples serve when the counts, and so the
       labels, agree, as with the defaults: 500 = 50 x 10); skipped with a reason when
       $VQGAN_INCEPTION_WEIGHTS is unset or missing. Far fewer images than a published FID: compare
       rows, not papers;
     * on-class accuracy: `--on-class-per-class` samples per class labelled by eval/classifier.py's
       SmallCNN trained on the real images (cached under runs/classifier-priors-DATASET); its accuracy
       on real held-out images and on their tokenizer reconstructions is printed as the ceiling;
     * throughput: images/s sampling the codes of one batch of `--batch` (median of `--repeats` after a
       warm-up) and latency: one image at batch 1 (median of 5 after a warm-up). Tokenizer decoding
       is the same for both priors and is left out; its cost per batch is printed once.
B. Speed at 256 tokens (`--speed`): random-weight fp32 priors, code_shape (16, 16), vocab 1024,
   10 classes, sizes tiny / small / gpt-b; seconds to sample one batch of `--speed-batches` with the
   AR prior (KV cache, guidance 1.0) and the masked prior at each T of `--masked-steps` (median of
   `--repeats` after a warm-up), tokens/s, and the masked prior's speed-up over AR.
Results go to OUT/priors.json (a dataset's or the speed part's entry is replaced, the others are
kept); progress goes to stderr, training logs to OUT/DATASET/{ar,masked}/train.log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from benchmarks._common import machine_header, median_seconds  # noqa: E402
from common import config_to_dict, load_config  # noqa: E402
from data.codes import CodeDataset  # noqa: E402
from eval.classifier import ClassifierConfig, accuracy, load_or_train_classifier, predict  # noqa: E402
from stage2_prior import PRIOR_SIZES, CodePrior, PriorConfig, build_prior, generate  # noqa: E402
from stage2_prior.images import load_pair  # noqa: E402
from stage2_prior.masked_sample import DEFAULT_CHOICE_TEMPERATURE  # noqa: E402
from stage2_prior.train import PriorRunConfig, resolve_model_config  # noqa: E402

TINY_SOURCE = "synthetic:shapes?shape_size=0.55-0.85&textures=plain&layout=centered"  # configs/tiny.yaml
CIFAR = "../shared/assets/cifar10-partial"
SPEED_SIZES = {"tiny": dict(dim=128, depth=4, heads=4), "small": dict(dim=512, depth=8, heads=8),
               "gpt-b": PRIOR_SIZES["GPT-B"]}
LATENCY_REPEATS = 5


@dataclass
class DatasetSpec:
    codes: str            # `vqgan encode` output the priors train on
    tokenizer: str        # the tokenizer that made them (decodes the samples)
    train_spec: str       # real images the classifier learns from
    ref_spec: str         # held-out real images: FID reference and the classifier's own accuracy
    ref_split: str
    classifier_width: int
    classifier_steps: int


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def inception_skip_reason() -> str | None:
    """Why FID cannot run here, or None when $VQGAN_INCEPTION_WEIGHTS names a file."""
    path = os.environ.get("VQGAN_INCEPTION_WEIGHTS")
    if not path:
        return "VQGAN_INCEPTION_WEIGHTS is unset (no internet for torch-fidelity's download)"
    if not Path(path).expanduser().is_file():
        return f"VQGAN_INCEPTION_WEIGHTS={path} is not a file"
    return None


# ---- A. quality ---------------------------------------------------------------------------------

def ensure_prior(args: argparse.Namespace, name: str, ds: DatasetSpec, kind: str) -> dict:
    """Train (or reuse, or resume) OUT/name/kind with the tiny preset; -> training record."""
    run_dir = (args.out / name / kind).resolve()
    overrides = [f"model.prior_type={kind}", f"data.codes={Path(ds.codes).resolve()}",
                 f"data.tokenizer={Path(ds.tokenizer).resolve()}", f"train.steps={args.steps}",
                 f"train.out_dir={run_dir}"]
    cfg = load_config(PriorRunConfig, REPO / "configs" / "tiny.yaml", overrides, section="prior")
    wanted = config_to_dict(replace(cfg, model=resolve_model_config(cfg, CodeDataset(cfg.data.codes))))
    saved_path, record_path = run_dir / "config.json", run_dir / "bench-train.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    if saved is not None and saved != wanted:
        keys = sorted(f"{s}.{k}" for s in wanted for k in wanted[s] if saved.get(s, {}).get(k) != wanted[s][k])
        sys.exit(f"{run_dir} holds a run with another configuration ({', '.join(keys)}): remove it or pick "
                 f"another --out")
    done = (run_dir / "prior" / "config.json").is_file() and (run_dir / "final_stats.json").is_file()
    if saved is None or not done:
        resumed = any((run_dir / "checkpoints").glob("step_*"))
        log(f"[{name}] training the {kind} prior, {args.steps} steps{' (resuming)' if resumed else ''} "
            f"-> {run_dir}/train.log")
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(run_dir / "train.log", "a") as f:
            code = subprocess.call([sys.executable, "-m", "vqgan", "train-prior", "--config",
                                    str(REPO / "configs" / "tiny.yaml"), "--resume", "auto", *overrides],
                                   cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if code != 0:
            sys.exit(f"train-prior failed ({run_dir / 'train.log'}):\n" + (run_dir / "train.log").read_text()[-3000:])
        record = {"train_wall_s": time.perf_counter() - start, "resumed": resumed, "steps": args.steps}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    else:
        log(f"[{name}] reusing the finished {kind} prior in {run_dir}")
        record = json.loads(record_path.read_text()) if record_path.is_file() else {"train_wall_s": None}
    stats = json.loads((run_dir / "final_stats.json").read_text())
    return {**record, "dir": str(run_dir), "parameters": stats["parameters"], "final_loss": stats["loss"],
            "train_tokens_per_s": stats["tokens_per_s"]}


@torch.no_grad()
def sample_images(prior: CodePrior, tokenizer: torch.nn.Module, labels: torch.Tensor, options: dict,
                  batch: int, seed: int) -> torch.Tensor:
    """Decoded samples (N, 3, H, W) in [-1, 1] on the CPU, one fixed-seed generator over the batches."""
    device = next(prior.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = []
    for chunk in labels.split(batch):
        codes = generate(prior, labels=chunk.to(device), generator=generator, **options)
        images.append(tokenizer.decode(codes).float().cpu())
    return torch.cat(images)


def small_fid(images: torch.Tensor, ds: DatasetSpec, resolution: int, cache: Path, device: str) -> float:
    from eval.fidelity import compute_metrics  # torch-fidelity: only imported when FID runs
    result = compute_metrics(torch.utils.data.TensorDataset(images), ds.ref_spec, fid=True, kid=False, prc=False,
                             resolution=resolution, split=ds.ref_split, limit=len(images), cache_dir=cache,
                             device=device, verbose=False)
    return result["fid"]


def classifier_ceilings(classifier: torch.nn.Module, tokenizer: torch.nn.Module, ds: DatasetSpec,
                        resolution: int, device: str) -> tuple[float, float]:
    """The classifier's accuracy on held-out real images and on their tokenizer reconstructions (200)."""
    real = accuracy(classifier, ds.ref_spec, resolution, split=ds.ref_split, limit=500)
    held_out = data.build_dataset(ds.ref_spec, resolution=resolution, split=ds.ref_split, shuffle=False)
    count = min(200, len(held_out))
    images, labels = map(torch.stack, zip(*[(held_out[i][0], torch.tensor(held_out[i][1])) for i in range(count)]))
    with torch.no_grad():
        recon = torch.cat([tokenizer.decode(tokenizer.encode(chunk.to(device))).float().cpu()
                           for chunk in images.split(100)])
    return real, (predict(classifier, recon) == labels).float().mean().item()


def quality(args: argparse.Namespace, name: str, ds: DatasetSpec, fid_reason: str | None) -> dict:
    device, sync = args.device, (torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None))
    runs = {kind: ensure_prior(args, name, ds, kind) for kind in ("ar", "masked")}
    priors = {}
    for kind, run in runs.items():
        priors[kind], tokenizer = load_pair(Path(run["dir"]) / "prior", ds.tokenizer, device=device)
    resolution, num_classes = tokenizer.config.resolution, priors["ar"].config.num_classes
    L = priors["ar"].seq_len
    if num_classes == 0:
        sys.exit(f"[{name}] the priors are unconditional: on-class accuracy needs labelled codes")

    log(f"[{name}] classifier (cached under runs/classifier-priors-{name}) ...")
    classifier = load_or_train_classifier(
        ClassifierConfig(source=ds.train_spec, resolution=resolution, num_classes=num_classes,
                         width=ds.classifier_width, steps=ds.classifier_steps),
        REPO / "runs" / f"classifier-priors-{name}", progress=False)
    real_acc, recon_acc = classifier_ceilings(classifier, tokenizer, ds, resolution, device)
    codes = generate(priors["ar"], labels=torch.arange(args.batch, device=device) % num_classes, seed=args.seed)
    decode_s = median_seconds(lambda: tokenizer.decode(codes), args.repeats, sync)

    common = dict(cfg_scale=args.cfg, temperature=args.temperature)
    decodings = [("ar", f"KV cache, {L} steps", L, dict(common))]
    decodings += [("masked", f"T={T}", T, dict(common, steps=T, choice_temperature=args.choice_temperature))
                  for T in args.masked_steps]
    on_labels = torch.arange(args.on_class_per_class * num_classes) % num_classes
    fid_labels = torch.arange(args.fid_samples) % num_classes

    a, m = runs["ar"], runs["masked"]
    print(f"\n## {name}: codes {ds.codes} ({L} tokens, {num_classes} classes), tokenizer {ds.tokenizer}\n")
    for kind, run in runs.items():
        print(f"{kind} prior: {run['parameters']:,} parameters, {args.steps} steps, final loss "
              f"{fmt(run['final_loss'], '.3f')}, training {fmt(run['train_wall_s'], '.0f')} s"
              f"{' (this invocation only: resumed)' if run.get('resumed') else ''}")
    diff = m["parameters"] - a["parameters"]
    width = priors["ar"].config.dim
    print(f"difference: {diff:,} parameters ({'the [MASK] embedding row' if diff == width else f'dim is {width}'})")
    print(f"guidance {args.cfg:g}, temperature {args.temperature:g}, masked choice temperature "
          f"{args.choice_temperature:g}, seed {args.seed}; classifier ({ds.train_spec}, width {ds.classifier_width}, "
          f"{ds.classifier_steps} steps): real held-out {100 * real_acc:.1f}%, tokenizer reconstructions "
          f"{100 * recon_acc:.1f}%; decoding {args.batch} images with the tokenizer takes {decode_s * 1e3:.0f} ms")
    if fid_reason:
        print(f"FID skipped: {fid_reason}")
    fid_head = f"small-sample FID ({args.fid_samples} vs {args.fid_samples} {ds.ref_split})"
    print(f"\n| prior | decoding | forward passes / image | {fid_head} | on-class % ({len(on_labels)} samples) "
          f"| images/s (batch {args.batch}) | latency ms (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for kind, label, passes, options in decodings:
        prior = priors[kind]
        log(f"[{name}] {kind} {label}: on-class samples ...")
        images = sample_images(prior, tokenizer, on_labels, options, args.batch, args.seed)
        on_class = (predict(classifier, images) == on_labels).float().mean().item()
        fid = None
        if not fid_reason:
            if not torch.equal(fid_labels, on_labels):
                log(f"[{name}] {kind} {label}: FID samples ...")
                images = sample_images(prior, tokenizer, fid_labels, options, args.batch, args.seed)
            log(f"[{name}] {kind} {label}: FID ...")
            fid = small_fid(images, ds, resolution, args.out / "fid-cache", device)
        log(f"[{name}] {kind} {label}: throughput and latency ...")
        batch_labels = (torch.arange(args.batch) % num_classes).to(device)
        seconds = median_seconds(lambda: generate(prior, labels=batch_labels, seed=args.seed, **options),
                                 args.repeats, sync)
        latency = median_seconds(lambda: generate(prior, labels=batch_labels[:1], seed=args.seed, **options),
                                 LATENCY_REPEATS, sync)
        row = {"prior": kind, "decoding": label, "forward_passes": passes, "fid": fid, "on_class": on_class,
               "images_per_s": args.batch / seconds, "latency_s": latency, **options}
        rows.append(row)
        print(f"| {kind} | {label} | {passes} | {fmt(fid, '.1f')} | {100 * on_class:.1f} | "
              f"{row['images_per_s']:.1f} | {latency * 1e3:.1f} |", flush=True)
    return {"dataset": vars(ds), "training": runs, "classifier_real_accuracy": real_acc,
            "classifier_reconstruction_accuracy": recon_acc, "tokenizer_decode_s_per_batch": decode_s,
            "fid_skipped": fid_reason, "fid_samples": args.fid_samples, "rows": rows}


# ---- B. speed -----------------------------------------------------------------------------------

def speed(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    sync: Callable[[], object] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"\n## speed at 256 tokens: random weights, fp32, vocab 1024, 10 classes, guidance 1.0, device {device}, "
          f"median of {args.repeats} after a warm-up\n")
    print("| size | parameters AR / masked | batch | decoding | seconds / batch | tokens/s | speed-up over AR |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        priors = {}
        for kind in ("ar", "masked"):
            torch.manual_seed(args.seed)
            config = PriorConfig(prior_type=kind, vocab_sizes=(1024,), code_shape=(16, 16), num_classes=10,
                                 **SPEED_SIZES[size])
            priors[kind] = build_prior(config).to(device).eval()
        params = f"{priors['ar'].num_parameters() / 1e6:.2f}M / {priors['masked'].num_parameters() / 1e6:.2f}M"
        L = priors["ar"].seq_len
        for batch in args.speed_batches:
            labels = torch.arange(batch, device=device) % 10
            decodings = [("ar", f"AR, KV cache, {L} steps", {})]
            decodings += [("masked", f"masked, T={T}", dict(steps=T, choice_temperature=args.choice_temperature))
                          for T in args.masked_steps]
            ar_seconds = None
            for kind, label, options in decodings:
                log(f"[speed] {size}, batch {batch}, {label} ...")
                seconds = median_seconds(lambda: generate(priors[kind], labels=labels, cfg_scale=1.0,
                                                          seed=args.seed, **options), args.repeats, sync)
                ar_seconds = ar_seconds or seconds
                row = {"size": size, "parameters": priors[kind].num_parameters(), "batch": batch, "prior": kind,
                       "decoding": label, "seconds": seconds, "tokens_per_s": batch * L / seconds,
                       "speedup_over_ar": ar_seconds / seconds}
                rows.append(row)
                print(f"| {size} | {params} | {batch} | {label} | {seconds:.3f} | {row['tokens_per_s']:.0f} | "
                      f"{row['speedup_over_ar']:.2f}x |", flush=True)
    return rows


# ---- main ---------------------------------------------------------------------------------------

def datasets(args: argparse.Namespace) -> dict[str, DatasetSpec]:
    width, steps = args.classifier_width, args.classifier_steps
    return {
        "embedded": DatasetSpec(args.embedded_codes, args.embedded_tokenizer, args.embedded_source,
                                args.embedded_source, "val", width or ClassifierConfig.width,
                                steps or ClassifierConfig.steps),
        "cifar": DatasetSpec(args.cifar_codes, args.cifar_tokenizer, args.cifar_train, args.cifar_test, "test",
                             width or 32, steps or 600),  # benchmarks/augment.py's CIFAR classifier
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=["embedded", "cifar"], choices=["embedded", "cifar"])
    p.add_argument("--no-quality", action="store_true", help="skip part A (same as an empty --datasets)")
    p.add_argument("--speed", action="store_true", help="run part B, the 256-token speed table")
    p.add_argument("--out", type=Path, default=Path("runs/bench-priors"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200, help="training steps of both priors")
    p.add_argument("--masked-steps", type=int, nargs="+", default=[4, 8, 16], help="masked decoding passes T")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale (part A)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--choice-temperature", type=float, default=DEFAULT_CHOICE_TEMPERATURE)
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--on-class-per-class", type=int, default=50)
    p.add_argument("--batch", type=int, default=100, help="sampling batch (part A)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up")
    p.add_argument("--classifier-width", type=int, default=None, help="default: 16 embedded, 32 cifar")
    p.add_argument("--classifier-steps", type=int, default=None, help="default: 300 embedded, 600 cifar")
    p.add_argument("--embedded-codes", default="runs/demo/codes")
    p.add_argument("--embedded-tokenizer", default="runs/demo/stage1/tokenizer")
    p.add_argument("--embedded-source", default=TINY_SOURCE)
    p.add_argument("--cifar-codes", default="runs/bench-augment/codes")
    p.add_argument("--cifar-tokenizer", default="runs/bench-quantizers-cifar/vq-l2/train/tokenizer")
    p.add_argument("--cifar-train", default=f"npz:{CIFAR}/train.npz?classes=cifar10")
    p.add_argument("--cifar-test", default=f"npz:{CIFAR}/test.npz?classes=cifar10")
    p.add_argument("--sizes", nargs="+", default=list(SPEED_SIZES), choices=list(SPEED_SIZES))
    p.add_argument("--speed-batches", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    if args.no_quality:
        args.datasets = []
    if not args.datasets and not args.speed:
        p.error("nothing to do: give --datasets and/or --speed")
    for name in ("steps", "fid_samples", "on_class_per_class", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.fid_samples < 2 or min(args.masked_steps) < 1 or min(args.speed_batches) < 1:
        p.error("--fid-samples needs at least 2; --masked-steps and --speed-batches must be positive")
    return args


def main() -> None:
    args = parse_args()
    os.chdir(REPO)  # relative paths (runs/..., npz:../shared/...) are the repository root's
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    header = machine_header()
    print(header)
    meta = {"machine": header, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    path = args.out / "priors.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # earlier parts and datasets are kept
    if args.datasets:
        fid_reason = inception_skip_reason()
        specs = datasets(args)
        for name in args.datasets:
            results.setdefault("quality", {})[name] = {**meta, **quality(args, name, specs[name], fid_reason)}
    if args.speed:
        results["speed"] = {**meta, "rows": speed(args)}
    path.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
