"""eval.fidelity: inputs become uint8 datasets, FID/KID/PR/IS through torch-fidelity behave as they
must (self ~ 0, halves << noise, IS 1 for one image), agree with pytorch-fid, and fail clearly.

Inception on CPU costs ~0.2 s an image here and torch-fidelity's FID ~6 s (eigenvalues of a
2048 x 2048 matrix), so the heavy checks use 16 images of 32 px and share one module fixture and
a feature cache. Tests needing the offline Inception weights skip, saying so, when it is absent."""
from __future__ import annotations

import re
import urllib.error
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset
from torchvision.utils import save_image

from data import SyntheticShapes, build_dataset
from eval.fidelity import (WEIGHTS_ENV, InceptionWeightsUnavailable, SampleSource, as_fidelity_input,
                           compute_metrics, reference_cache_name, resolve_inception_weights)
from stage1_tokenizer import QuantizerConfig, VQGAN, VQGANConfig
from stage2_prior import GPTPrior, PriorConfig
from conftest import asset

WEIGHTS = "inception/weights-inception-2015-12-05-fid-only.pth"
SPEC, RES, N = "synthetic:shapes", 32, 16  # reference: the first N images of the val split


class Images(Dataset):
    """A tensor of images (float [-1, 1] or uint8) as a Dataset of (image, label) pairs."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], -1


def shapes(start: int, count: int, resolution: int = RES) -> torch.Tensor:
    dataset = build_dataset(SPEC, resolution=resolution, split="val")
    return torch.stack([dataset[i][0] for i in range(start, start + count)])  # (count, 3, R, R) in [-1, 1]


def uint8(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(len(dataset))])


@contextmanager
def one_thread():
    """One torch thread and one BLAS thread. On these 2 busy cores Inception runs 2x faster on one
    thread (0.2 vs 0.5 s an image), the tiny prior 10x, and torch-fidelity's eigenvalues of a
    2048 x 2048 matrix take ~6 s on one OpenBLAS thread but 15-40 s on two (they spin on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dev extra; without it the tests only run slower
        threadpool_limits = None
    try:
        with threadpool_limits(1, user_api="blas") if threadpool_limits else nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # after conftest's autouse fixture, which sets two
        yield


@pytest.fixture(scope="module")
def weights() -> str:
    return str(asset(WEIGHTS))


@pytest.fixture(scope="module")
def scores(weights, tmp_path_factory) -> dict:
    """One feature pass per image set: the reference's features are cached and reused by every call."""
    cache = tmp_path_factory.mktemp("fidelity_cache")
    common = dict(inception_weights=weights, cache_dir=cache, resolution=RES, split="val", limit=N,
                  verbose=False, save_cpu_ram=True)
    reference = reference_cache_name(SPEC, "val", RES, N, weights)
    noise = torch.randint(0, 256, (N, 3, RES, RES), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with one_thread():  # module fixtures are set up before the autouse one
        return {"cache": cache, "reference": reference,
                "self": compute_metrics(SPEC, SPEC, input1_cache_name=reference, **common),
                "halves": compute_metrics(Images(shapes(N, N)), SPEC, **common),
                "noise": compute_metrics(Images(noise), SPEC, **common)}


# ---- metrics with the real FID Inception ----

def test_a_set_against_itself(scores):
    result = scores["self"]
    assert abs(result["fid"]) < 1e-2
    assert result["kid_mean"] < 0  # unbiased MMD of a set with itself: the cross term keeps its diagonal
    assert result["precision"] == result["recall"] == 1.0
    assert result["num_images1"] == result["num_images2"] == N
    assert result["kid_subset_size"] == N  # adapted from torch-fidelity's 1000


def test_disjoint_halves_score_far_closer_than_noise(scores):
    halves, noise = scores["halves"], scores["noise"]
    for result in (halves, noise):
        assert set(result) >= {"fid", "kid_mean", "kid_std", "precision", "recall", "f_score"}
        assert all(isinstance(result[k], float) for k in ("fid", "kid_mean", "precision", "recall"))
        assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    # FID is biased upward at N=16 (halves ~200, noise ~400 here), so its ratio stays small;
    # KID is unbiased, so there the same set scores ~0 and noise far above it
    assert 0 < halves["fid"] < noise["fid"] / 1.5
    assert abs(halves["kid_mean"]) < 0.05 < 0.2 < noise["kid_mean"]
    assert noise["kid_mean"] > 10 * max(halves["kid_mean"], 0.01)
    assert noise["precision"] < halves["precision"] and noise["recall"] < halves["recall"]


def test_reference_features_come_from_the_cache(scores, weights, monkeypatch):
    assert any(p.name.startswith(scores["reference"]) for p in scores["cache"].iterdir())

    def unreadable(self, index):
        raise AssertionError("the reference images were read again instead of the cached features")

    monkeypatch.setattr(SyntheticShapes, "__getitem__", unreadable)
    prior, tokenizer = tiny_pair()
    source = SampleSource(prior, tokenizer, 8, batch_size=4, seed=0)
    result = compute_metrics(source, SPEC, fid=False, inception_weights=weights, cache_dir=scores["cache"],
                             resolution=RES, limit=N, verbose=False)  # limit: the reference's
    assert result["num_images1"] == 8 and result["num_images2"] == N and result["kid_subset_size"] == 8
    assert 0.0 <= result["precision"] <= 1.0


def test_fid_agrees_with_pytorch_fid(scores, weights, monkeypatch):
    pytest.importorskip("pytorch_fid")
    from pytorch_fid import inception as pfid_inception
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    state = torch.load(weights, map_location="cpu", weights_only=True)
    # pytorch-fid's FID Inception is torchvision's Inception3 with the FID blocks, and torch-fidelity's
    # is a port of it: all 566 parameter names and shapes match, so our file loads into it as is
    monkeypatch.setattr(pfid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    model = pfid_inception.InceptionV3([3], resize_input=False, normalize_input=False).eval()

    def activations(images: torch.Tensor) -> np.ndarray:
        # Same pixels into both networks: pytorch-fid's own resize (half-pixel bilinear) and scaling
        # (x/255*2-1) differ from the TF1 graph's, which torch-fidelity reproduces; so resize with
        # torch-fidelity's TF1 bilinear and scale by (x-128)/128 as its network does, and let
        # pytorch-fid's network and FID code do the rest. What is compared: two Inception
        # implementations and two FID formulas (eigvals of S1 S2 vs scipy sqrtm) on one input.
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        with torch.no_grad():
            return model((x - 128) / 128)[0].flatten(1).double().numpy()  # (n, 2048)

    generated = activations(uint8(as_fidelity_input(Images(shapes(N, N)))))
    reference = activations(uint8(as_fidelity_input(SPEC, resolution=RES, limit=N)))
    # scipy's sqrtm of a 2048 x 2048 matrix takes over a minute on 2 cores. With N=16 both covariances
    # and the mean difference live in a <= 2N-dim subspace, and FID is invariant to an orthonormal
    # change of basis there, so hand pytorch-fid the exact statistics in that basis
    mu1, mu2 = generated.mean(0), reference.mean(0)
    _, singular, basis = np.linalg.svd(np.concatenate([generated - mu1, reference - mu2, (mu1 - mu2)[None]]),
                                       full_matrices=False)
    basis = basis[singular > singular[0] * 1e-10]                       # (k, 2048) orthonormal rows
    p1, p2 = generated @ basis.T, reference @ basis.T
    expected = calculate_frechet_distance(p1.mean(0), np.cov(p1, rowvar=False), p2.mean(0), np.cov(p2, rowvar=False))
    # 1 % was the requirement; the two agree to ~1e-6 here, so 0.1 % still leaves room for other BLAS
    assert scores["halves"]["fid"] == pytest.approx(expected, rel=1e-3)


def test_inception_score(weights, tmp_path):
    with pytest.warns(UserWarning, match="fc"):
        result = compute_metrics(Images(shapes(0, 4)), isc=True, fid=False, kid=False, prc=False,
                                 inception_weights=weights, verbose=False)  # returns before any Inception
    assert result["is_mean"] is None and "all zero" in result["is_reason"]  # never the meaningless 1.0

    # the asset has no logits layer: give it a random (seeded) one so the IS path runs for real
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(0)) * 0.1
    random_fc = tmp_path / "inception-random-fc.pth"
    torch.save(state, random_fc)
    common = dict(isc=True, fid=False, kid=False, prc=False, inception_weights=random_fc, verbose=False,
                  save_cpu_ram=True)
    varied = compute_metrics(Images(shapes(0, 8)), **common)
    repeated = compute_metrics(Images(shapes(0, 1).expand(4, -1, -1, -1)), **common)
    assert repeated["is_mean"] == pytest.approx(1.0, abs=1e-6)  # p(y|x) = p(y): KL 0
    assert varied["is_mean"] > 1.05 and varied["is_splits"] == 4


def test_reference_cache_name_separates_what_changes_the_features(weights, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    spec = "npz:/data/cifar10 (v2)/train.npz?classes=cifar10"
    base = (spec, "train", 32, 4660, weights)
    variants = [base, (spec, "val", 32, 4660, weights), (spec, "train", 64, 4660, weights),
                (spec, "train", 32, 100, weights), (spec, "train", 32, 4660, None), (SPEC, "train", 32, 4660, weights)]
    names = {reference_cache_name(*args) for args in variants}
    assert len(names) == len(variants)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)  # a file name torch-fidelity can use
    assert reference_cache_name(*base) in names  # stable


# ---- inputs ----

def test_inputs_become_the_same_uint8_images(tmp_path):
    images = shapes(0, 5)
    for i, image in enumerate(images):
        save_image((image + 1) / 2, tmp_path / f"{i:03d}.png")  # what stage2_prior.images.write_images does
    (tmp_path / "notes.txt").write_text("not an image")
    from_tensor = uint8(as_fidelity_input(Images(images)))
    assert from_tensor.dtype == torch.uint8 and from_tensor.shape == (5, 3, RES, RES)
    assert torch.equal(uint8(as_fidelity_input(tmp_path)), from_tensor)  # PNG round trip is exact
    assert torch.equal(uint8(as_fidelity_input(str(tmp_path), limit=2)), from_tensor[:2])
    assert torch.equal(uint8(as_fidelity_input(SPEC, resolution=RES, limit=5)), from_tensor)
    assert torch.equal(uint8(as_fidelity_input(Images(from_tensor))), from_tensor)  # uint8 passes through


class Stream(IterableDataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __iter__(self):
        return ((image, 0) for image in self.images)


def test_streams_are_read_in_order_up_to_the_limit():
    images = shapes(0, 6)
    view = as_fidelity_input(Stream(images), limit=4)
    assert len(view) == 4 and view.sequential
    first = view[0]  # torch-fidelity peeks at item 0, then reads 0..N-1: the stream restarts once
    assert torch.equal(uint8(view), uint8(as_fidelity_input(Images(images[:4]))))
    assert torch.equal(uint8(view)[0], first)
    with pytest.raises(ValueError, match="limit=N"):
        as_fidelity_input(Stream(images))
    with pytest.raises(ValueError, match="ended after 6"):
        uint8(as_fidelity_input(Stream(images), limit=8))


def tiny_pair() -> tuple[GPTPrior, VQGAN]:
    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  z_channels=8, norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))
    prior = GPTPrior(PriorConfig(dim=32, depth=2, heads=2, code_shape=(8, 8), vocab_sizes=(16,), num_classes=3))
    return prior.eval(), tokenizer.eval()


def test_sample_source_is_deterministic_balanced_and_holds_one_batch():
    prior, tokenizer = tiny_pair()
    source = SampleSource(prior, tokenizer, 10, batch_size=4, seed=3, cfg_scale=2.0)
    assert source.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    forward = uint8(source)
    assert forward.shape == (10, 3, 16, 16) and forward.dtype == torch.uint8
    assert source._cached[0] == 2 and len(source._cached[1]) == 2  # only the last (partial) batch is held
    backward = torch.stack([source[i] for i in reversed(range(10))]).flip(0)
    assert torch.equal(forward, backward)  # item i does not depend on the reading order
    assert torch.equal(uint8(SampleSource(prior, tokenizer, 10, batch_size=4, seed=3, cfg_scale=2.0)), forward)
    assert not torch.equal(uint8(SampleSource(prior, tokenizer, 10, batch_size=4, seed=4, cfg_scale=2.0)), forward)
    assert SampleSource(prior, tokenizer, 4, labels=None).labels is None
    with pytest.raises(ValueError, match="one label per sample"):
        SampleSource(prior, tokenizer, 4, labels=[0, 1])
    with pytest.raises(ValueError, match="num_samples"):
        SampleSource(prior, tokenizer, 0)
    with pytest.raises(ValueError, match="num_samples"):
        as_fidelity_input(source, limit=3)


# ---- errors ----

def test_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_inception_weights(None) is None
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_inception_weights(missing)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        compute_metrics(Images(shapes(0, 4)), Images(shapes(4, 4)), inception_weights=missing, verbose=False)
    present = tmp_path / "w.pth"
    present.write_bytes(b"")
    monkeypatch.setenv(WEIGHTS_ENV, str(present))
    assert resolve_inception_weights(None) == str(present.resolve())
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_ENV}.*nope.pth"):
        resolve_inception_weights(None)


def test_failed_weights_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy of torch-fidelity's weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsUnavailable, match=f"--inception-weights PATH.*{WEIGHTS_ENV}"):
        compute_metrics(Images(shapes(0, 4)), Images(shapes(4, 4)), verbose=False)


def test_bad_inputs_are_clear_value_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot evaluate int"):
        as_fidelity_input(123)
    with pytest.raises(ValueError, match="neither an existing image folder nor a data spec"):
        as_fidelity_input(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no"):
        as_fidelity_input(tmp_path)
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        as_fidelity_input(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="resolution"):
        as_fidelity_input(SPEC)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        as_fidelity_input(Images(torch.zeros(2, 1, 8, 8)))[0]
    with pytest.raises(ValueError, match="give input2"):
        compute_metrics(Images(shapes(0, 4)))
    with pytest.raises(ValueError, match="needs cache_dir"):
        compute_metrics(Images(shapes(0, 4)), Images(shapes(4, 4)), input2_cache_name="ref")
    with pytest.raises(ValueError, match="at least 4"):
        compute_metrics(Images(shapes(0, 3)), Images(shapes(4, 4)))
