"""FID, KID, precision/recall and Inception Score through torch-fidelity: the project's one door to it.

Every input (an image folder, a data spec, a Dataset of images, a `SampleSource` that samples a
prior on demand) becomes a map-style Dataset of uint8 (3, H, W) tensors, and torch-fidelity does the
rest: the TF-2015 FID Inception with its TF1-compatible bilinear resize to 299 px, the statistics,
the metrics and the on-disk cache of reference features. Precision/recall use the same Inception
pool features (as the ADM evaluator of guided-diffusion does) instead of torch-fidelity's default
VGG16, so one feature pass serves all metrics and no second network has to be downloaded.
Convention (torch-fidelity's): input1 is generated, input2 is the reference.
"""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import re
import urllib.error
import warnings
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset, IterableDataset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import glob_samples_paths

from data import build_dataset
from data.sources import SOURCES, parse_spec
from stage2_prior import generate

WEIGHTS_ENV = "VQGAN_INCEPTION_WEIGHTS"
FEATURE_EXTRACTOR = "inception-v3-compat-nhwc"  # torch-fidelity's port of the TF FID Inception, channels-last
IMAGE_EXTENSIONS = "png,jpg,jpeg"
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class InceptionV3ChannelsLast(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat` with channels-last weights: the same network and weights,
    features equal to ~1e-6, but oneDNN runs its convolutions 1.6x faster on a CPU (5.5 -> 9.0 img/s
    on 2 cores). Registered under its own name, so its cached features never mix with the original's."""

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):
        super().__init__(name, features_list, **kwargs)
        self.to(memory_format=torch.channels_last)


if FEATURE_EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR, InceptionV3ChannelsLast)


class InceptionWeightsUnavailable(RuntimeError):
    """torch-fidelity could not download its Inception weights (no internet)."""


def resolve_inception_weights(path: str | Path | None = None) -> str | None:
    """The Inception weights file to use: `path`, else $VQGAN_INCEPTION_WEIGHTS, else None
    (torch-fidelity downloads its own). A named file that does not exist is a FileNotFoundError."""
    chosen, origin = (path, "inception weights") if path not in (None, "") else \
        (os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}")
    if chosen is None:
        return None
    resolved = Path(chosen).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{origin}: no such file {str(chosen)!r} (expected torch-fidelity's Inception "
                                f"state dict, e.g. weights-inception-2015-12-05-*.pth)")
    return str(resolved.resolve())


def _is_weights_download(error: BaseException) -> bool:
    """A network error raised while torch.hub fetched a checkpoint (not while reading data)."""
    if not isinstance(error, _NETWORK_ERRORS):
        return False
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("load_state_dict_from_url", "download_url_to_file"):
            return True
        tb = tb.tb_next
    return False


@contextmanager
def inception_download_errors() -> Iterator[None]:
    """Turn torch-fidelity's failed download of its Inception weights into InceptionWeightsUnavailable
    saying how to give a local copy; other errors pass through unchanged."""
    try:
        yield
    except Exception as error:
        if not _is_weights_download(error):
            raise
        raise InceptionWeightsUnavailable(
            f"could not download torch-fidelity's Inception weights ({error}); without internet pass "
            f"--inception-weights PATH (inception_weights=PATH) or set {WEIGHTS_ENV}=PATH to a local copy "
            f"of weights-inception-2015-12-05-6726825d.pth") from error


@lru_cache(maxsize=8)
def _weights_info(path: str, size: int, mtime_ns: int) -> tuple[str, bool]:
    """(sha256[:12], whether `fc` has any non-zero weight); keyed on size and mtime so edits re-hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    try:  # mmap: only the fc tensor is read from the ~100 MB file
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old-format or pickled file: load it the way torch-fidelity does
        state = torch.load(path, map_location="cpu", weights_only=False)
    fc = state.get("fc.weight")
    return digest.hexdigest()[:12], bool(fc is not None and fc.any())


def _weights_tag_and_logits(weights: str | None) -> tuple[str, bool]:
    if weights is None:
        return "tfdefault", True  # torch-fidelity's download carries the 1008-way logits
    stat = os.stat(weights)
    return _weights_info(weights, stat.st_size, stat.st_mtime_ns)


def reference_cache_name(spec: str, split: str, resolution: int, count: int, weights: str | Path | None = None) -> str:
    """torch-fidelity cache entry for reference features of `count` images of `spec`/`split` at
    `resolution` under the given Inception weights (resolved as in `resolve_inception_weights`)."""
    tag, _ = _weights_tag_and_logits(resolve_inception_weights(weights))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[-48:]
    key = hashlib.sha256(f"{spec}|{split}|{resolution}|{count}|{tag}".encode()).hexdigest()[:10]
    return f"ref-{slug}-{split}-r{resolution}-n{count}-w{tag}-{key}"  # the key guards truncated slugs


# ---- inputs: everything becomes a Dataset of uint8 (3, H, W) ----

def _to_uint8(item: Any, where: str) -> torch.Tensor:
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: expected an image tensor (3, H, W) (or an (image, label) pair), got "
                         f"{type(image).__name__}{tuple(image.shape) if torch.is_tensor(image) else ''}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(f"{where}: images must be uint8 or float in [-1, 1], got {image.dtype}")
    # the rounding of torchvision's save_image, so in-memory images score like their saved PNGs
    return ((image.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


class _UInt8Images(Dataset):
    """A map-style dataset of float [-1, 1] or uint8 images (or (image, label) pairs), first `limit`."""

    def __init__(self, dataset: Dataset, limit: int | None, name: str):
        self.dataset, self.name = dataset, name
        self.count = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return _to_uint8(self.dataset[index], self.name)


class _IterableImages(Dataset):
    """The first `limit` items of an IterableDataset, read in order; torch-fidelity reads item 0,
    then 0..N-1, so it restarts the stream only when asked to go back."""
    sequential = True  # main process only: each DataLoader worker would replay the whole stream

    def __init__(self, dataset: IterableDataset, limit: int, name: str):
        self.dataset, self.count, self.name = dataset, limit, name
        self._stream, self._next, self._last = None, 0, (None, None)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._last[0] == index:
            return self._last[1]
        if not 0 <= index < self.count:
            raise IndexError(index)
        if self._stream is None or index < self._next:
            self._stream, self._next = iter(self.dataset), 0
        for item in self._stream:
            self._next += 1
            if self._next - 1 == index:
                self._last = (index, _to_uint8(item, self.name))
                return self._last[1]
        raise ValueError(f"{self.name}: the stream ended after {self._next} images, fewer than limit={self.count}")


class SampleSource(Dataset):
    """Images sampled from a prior and decoded by its tokenizer, batch by batch on demand; only the
    current batch is held. Batch k uses a seed derived from (seed, k), so item i is the same however
    the source is read. labels: "balanced" (class i % num_classes for a class-conditional prior,
    none for an unconditional one), None (unconditional), or one class id per sample."""
    sequential = True  # sample in the main process: workers would copy the models

    def __init__(self, prior: torch.nn.Module, tokenizer: torch.nn.Module, num_samples: int, *,
                 batch_size: int = 64, labels: str | Sequence[int] | torch.Tensor | None = "balanced",
                 cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, steps: int | None = None,
                 choice_temperature: float | None = None):
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SampleSource: {name} must be a positive integer, got {value!r}")
        num_classes = prior.config.num_classes
        if isinstance(labels, str):
            if labels != "balanced":
                raise ValueError(f"SampleSource: labels must be 'balanced', None or class ids, got {labels!r}")
            labels = torch.arange(num_samples) % num_classes if num_classes else None
        elif labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (num_samples,):
                raise ValueError(f"SampleSource: give one label per sample ({num_samples}), got shape "
                                 f"{tuple(labels.shape)}")
        self.prior, self.tokenizer, self.num_samples, self.batch_size = prior, tokenizer, num_samples, batch_size
        self.labels, self.seed = labels, seed
        self.options = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        if prior.prior_type == "masked":  # decoding passes; None = the sampler's defaults
            self.options.update(steps=steps, choice_temperature=choice_temperature)
        elif steps is not None or choice_temperature is not None:
            raise ValueError("SampleSource: steps and choice_temperature apply to masked priors; this prior is "
                             "autoregressive")
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, k: int) -> torch.Tensor:
        """Batch k of the samples as uint8 (b, 3, H, W) on the CPU."""
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        start = k * self.batch_size
        count = min(self.batch_size, self.num_samples - start)
        if count < 1:
            raise IndexError(f"batch {k} is past the {self.num_samples} samples")
        device = next(self.prior.parameters()).device
        labels = self.labels[start:start + count].to(device) if self.labels is not None else None
        # an independent stream per batch: item i does not depend on the order batches are read in
        seed = int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0])
        codes = generate(self.prior, count if labels is None else None, labels=labels, seed=seed, **self.options)
        images = torch.stack([_to_uint8(image, "SampleSource") for image in self.tokenizer.decode(codes).cpu()])
        self._cached = (k, images)  # replaces the previous batch: memory stays one batch
        return images

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return self.batch(index // self.batch_size)[index % self.batch_size]


def _is_spec(text: str) -> bool:
    try:
        return parse_spec(text)[0] in SOURCES
    except ValueError:
        return False


def as_fidelity_input(source: str | Path | Dataset, *, resolution: int | None = None, split: str = "val",
                      limit: int | None = None) -> Dataset:
    """A folder of PNG/JPG images (as they are), a data spec (`synthetic:shapes`, `npz:FILE`; built at
    `resolution`, `split`), a Dataset of float [-1, 1] or uint8 images, or a SampleSource -> a Dataset
    of uint8 (3, H, W) for torch-fidelity, cut to the first `limit` images."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(source, SampleSource):
        if limit is not None:
            raise ValueError("limit does not apply to a SampleSource: set its num_samples")
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if os.path.isdir(text):
            files = glob_samples_paths(text, False, IMAGE_EXTENSIONS, "jpg,jpeg", verbose=False)
            if not files:
                raise ValueError(f"image folder {text!r} holds no {IMAGE_EXTENSIONS} files (sub-folders are not read)")
            return ImagesPathDataset(files[:limit] if limit else files)  # torch-fidelity's reader: uint8 RGB
        if isinstance(source, str) and _is_spec(source):
            if resolution is None:
                raise ValueError(f"data spec {source!r}: give the resolution to build it at")
            source = build_dataset(source, resolution=resolution, split=split, shuffle=False)
            name = f"data spec {text!r}"
        elif os.path.exists(text):
            raise ValueError(f"{text!r} is a file; expected an image folder or a data spec such as npz:{text}")
        else:
            raise ValueError(f"{text!r} is neither an existing image folder nor a data spec "
                             f"({', '.join(s.usage.split(' ')[0] for s in SOURCES.values())})")
    elif isinstance(source, Dataset):
        name = f"dataset {type(source).__name__}"
    else:
        raise ValueError(f"cannot evaluate {type(source).__name__}: expected an image folder, a data spec, "
                         f"a torch Dataset of images or a SampleSource")
    if isinstance(source, IterableDataset):
        if limit is None:
            raise ValueError(f"{name} is a stream of unknown length: give limit=N")
        return _IterableImages(source, limit, name)
    return _UInt8Images(source, limit, name)


# ---- metrics ----

def _device_context(device: str | torch.device) -> tuple[bool, Any]:
    """torch-fidelity knows only cuda=True/False (the current CUDA device); pick the index here."""
    device = torch.device(device)
    if device.type == "cpu":
        return False, nullcontext()
    if device.type == "cuda":
        return True, torch.cuda.device(device.index) if device.index is not None else nullcontext()
    raise ValueError(f"device must be 'cpu' or 'cuda[:N]' (torch-fidelity runs on those only), got {device}")


def compute_metrics(input1: str | Path | Dataset, input2: str | Path | Dataset | None = None, *,
                    fid: bool = True, kid: bool = True, prc: bool = True, isc: bool = False,
                    inception_weights: str | Path | None = None, cache_dir: str | Path | None = None,
                    input1_cache_name: str | None = None, input2_cache_name: str | None = None,
                    resolution: int | None = None, split: str = "val", limit: int | None = None,
                    batch_size: int = 64, device: str | torch.device = "cpu", kid_subset_size: int | None = None,
                    kid_subsets: int = 100, isc_splits: int = 10, prc_neighborhood: int = 3,
                    save_cpu_ram: bool = False, seed: int = 2020, verbose: bool = True) -> dict[str, Any]:
    """FID / KID / precision-recall of input1 (generated) against input2 (reference), and the
    Inception Score of input1, as plain floats: `fid`, `kid_mean`, `kid_std`, `precision`, `recall`,
    `f_score`, `is_mean`, `is_std` (keys of requested metrics only), plus `num_images1`,
    `num_images2`, `inception_weights`, `protocol`. Inputs: see `as_fidelity_input`; `resolution`
    and `split` apply to spec inputs, `limit` to all but a SampleSource. With `cache_dir`, features
    of named inputs are cached there; a spec input2 is named by `reference_cache_name` unless named.
    IS needs Inception logits: with weights whose `fc` is all zero it is None, with `is_reason`."""
    weights = resolve_inception_weights(inception_weights)
    binary = fid or kid or prc
    if not (binary or isc):
        raise ValueError("no metric requested: set at least one of fid, kid, prc, isc")
    if binary and input2 is None:
        raise ValueError("fid, kid and prc compare two image sets: give input2 (the reference)")
    if cache_dir is None and (input1_cache_name or input2_cache_name):
        raise ValueError("a cache name needs cache_dir (where torch-fidelity keeps the cached features)")

    def prepare(source: Any) -> Dataset:  # a SampleSource's count is its num_samples
        return as_fidelity_input(source, resolution=resolution, split=split,
                                 limit=None if isinstance(source, SampleSource) else limit)

    ds1, ds2 = prepare(input1), prepare(input2) if binary else None
    n1, n2 = len(ds1), len(ds2) if ds2 is not None else None
    for name, count, low in (("input1", n1, 2), ("input2", n2, 2)):
        if count is not None and count < max(low, prc_neighborhood + 1 if prc else 0):
            raise ValueError(f"{name} has {count} images; the metrics need at least "
                             f"{max(low, prc_neighborhood + 1 if prc else 0)}")
    if (cache_dir is not None and binary and input2_cache_name is None and isinstance(input2, str)
            and not os.path.isdir(input2)):
        assert resolution is not None  # as_fidelity_input checked it for specs
        input2_cache_name = reference_cache_name(input2, split, resolution, n2, weights)

    out: dict[str, Any] = {"num_images1": n1, "num_images2": n2,
                           "inception_weights": weights or "torch-fidelity download",
                           "protocol": f"torch-fidelity {torch_fidelity.__version__} {FEATURE_EXTRACTOR}"}
    if isc and not _weights_tag_and_logits(weights)[1]:
        reason = (f"Inception Score not computed: the fc (logits) layer of {weights} is all zero, so IS "
                  f"would be 1.0 whatever the images; use torch-fidelity's own weights (inception_weights=None)")
        warnings.warn(reason, stacklevel=2)
        out.update(is_mean=None, is_std=None, is_reason=reason)
        isc = False
        if not binary:
            return out
    # KID draws subsets without replacement: torch-fidelity errors if a subset exceeds a set's size
    kid_size = min(kid_subset_size or 1000, n1, n2 or n1)
    # each IS split needs >= 2 images, else its KL term is 0 and IS collapses to 1
    splits = max(1, min(isc_splits, n1 // 2))
    cuda, device_context = _device_context(device)
    kwargs = dict(input1=ds1, input2=ds2, fid=fid, kid=kid, prc=prc, isc=isc, cuda=cuda, batch_size=batch_size,
                  feature_extractor=FEATURE_EXTRACTOR, feature_layer_prc="2048",
                  feature_extractor_weights_path=weights, kid_subset_size=kid_size, kid_subsets=kid_subsets,
                  isc_splits=splits, prc_neighborhood=prc_neighborhood, rng_seed=seed, verbose=verbose,
                  cache=cache_dir is not None, cache_root=str(cache_dir) if cache_dir is not None else None,
                  input1_cache_name=input1_cache_name, input2_cache_name=input2_cache_name,
                  save_cpu_ram=save_cpu_ram or any(getattr(d, "sequential", False) for d in (ds1, ds2))
                  # torch-fidelity starts 4 loader workers; on a few cores they only steal Inception's time
                  or (os.cpu_count() or 1) <= 4)
    with inception_download_errors(), device_context:
        raw = torch_fidelity.calculate_metrics(**kwargs)
    names = {torch_fidelity.KEY_METRIC_FID: "fid", torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
             torch_fidelity.KEY_METRIC_KID_STD: "kid_std", torch_fidelity.KEY_METRIC_PRECISION: "precision",
             torch_fidelity.KEY_METRIC_RECALL: "recall", torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
             torch_fidelity.KEY_METRIC_ISC_MEAN: "is_mean", torch_fidelity.KEY_METRIC_ISC_STD: "is_std"}
    out.update({names[key]: float(value) for key, value in raw.items() if key in names})
    if kid:
        out["kid_subset_size"] = kid_size
    if isc:
        out["is_splits"] = splits
    for key in ("fid", "kid_mean"):
        if key in out and not math.isfinite(out[key]):
            warnings.warn(f"{key} is {out[key]}: too few images for a stable estimate?", stacklevel=2)
    return out
