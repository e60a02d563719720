"""The decode step's native CPU kernels (stage2_prior/decode_kernels.cpp) against torch references.

They build at first use on x86-64 Linux with AVX-512; elsewhere these tests skip with the reason
(`native_kernels.unavailable_reason`), and the sampler runs on torch's operators instead.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stage2_prior import GPTPrior, PriorConfig, generate, native_kernels
from stage2_prior.kv_cache import StaticKVDecoder

DTYPES = [torch.float32, torch.bfloat16]


def need(dtype: torch.dtype) -> None:
    if not native_kernels.available(dtype):
        pytest.skip(f"native {dtype} kernel unavailable: {native_kernels.unavailable_reason(dtype)}")


def reference_linear(x, weight, bias, gelu, norm=None):
    x = x.float()
    if norm is not None:
        x = F.layer_norm(x, x.shape[-1:], norm[0], None, norm[1])
    y = x.to(weight.dtype).float() @ weight.float().T + (0 if bias is None else bias)
    return F.gelu(y) if gelu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(24, 16), (130, 70), (256, 96)])  # tails of the 64-output tiles and of K
def test_linear_matches_torch(dtype, n, k):
    need(dtype)
    g = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    packed = native_kernels.pack(weight)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2   # bf16: one rounding of the output
    for rows in (1, 3, 4, 5, 9):                            # full blocks of 4 rows and every remainder
        for gelu in (False, True):
            for x_dtype in {dtype, torch.float32}:
                x = torch.randn(rows, k, generator=g).to(x_dtype)
                expected = reference_linear(x, weight, bias, gelu)
                for out_dtype in {dtype, torch.float32}:
                    out = torch.full((rows, n), float("nan"), dtype=out_dtype)
                    native_kernels.linear(x, packed, n, bias, gelu, out)
                    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_fused_layer_norm_and_residual_add(dtype):
    need(dtype)
    g = torch.Generator().manual_seed(1)
    weight, k, n = torch.randn(96, 48, generator=g).to(dtype), 48, 96
    norm = (torch.randn(k, generator=g), 1e-5)
    x = torch.randn(4, k, generator=g) * 3 + 1            # a mean and a scale for the norm to remove
    packed = native_kernels.pack(weight)
    out = torch.empty(4, n, dtype=dtype)
    native_kernels.linear(x, packed, n, None, False, out, norm=norm)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference_linear(x, weight, None, False, norm), atol=tolerance,
                               rtol=tolerance)
    residual = torch.randn(4, k, generator=g)
    weight_sq = torch.randn(k, k, generator=g).to(dtype)
    packed_sq = native_kernels.pack(weight_sq)
    got = residual.clone()
    native_kernels.linear(x, packed_sq, k, None, False, got, accumulate=True)
    torch.testing.assert_close(got, residual + reference_linear(x, weight_sq, None, False), atol=tolerance,
                               rtol=tolerance)


def test_gelu_is_the_exact_erf_form():
    need(torch.float32)
    x = torch.linspace(-8, 8, 1001).reshape(1, -1)                         # through an identity matmul
    k = x.shape[1]
    identity = native_kernels.pack(torch.eye(k))
    out = torch.empty(1, k)
    native_kernels.linear(x, identity, k, None, True, out)
    torch.testing.assert_close(out, F.gelu(x), atol=1e-6, rtol=1e-5)       # not the tanh approximation
    assert (out - F.gelu(x, approximate="tanh")).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
def test_attention_matches_sdpa_and_writes_the_cache(dtype, rotary):
    need(dtype)
    g = torch.Generator().manual_seed(2)
    B, H, Dh, L, rot = 3, 2, 32, 10, 16
    cache = torch.randn(2, B, H, L, Dh, generator=g).to(dtype)
    qkv = torch.randn(B, 3, H, Dh, generator=g)
    angles = torch.rand(rot // 2, generator=g) * 6
    cos, sin = (angles.cos(), angles.sin()) if rotary else (None, None)
    position = 6
    q, k, v = qkv.unbind(1)                                                  # (B, H, Dh)
    if rotary:  # x-transformers' interleaved pairs on the first `rot` features
        def turn(t):
            t = t.clone()
            a, b = t[..., 0:rot:2].clone(), t[..., 1:rot:2].clone()
            t[..., 0:rot:2], t[..., 1:rot:2] = a * cos - b * sin, b * cos + a * sin
            return t
        q, k = turn(q), turn(k)
    expected_cache = cache.clone()
    expected_cache[0, :, :, position], expected_cache[1, :, :, position] = k.to(dtype), v.to(dtype)
    keys, values = expected_cache[0, :, :, :position + 1].float(), expected_cache[1, :, :, :position + 1].float()
    expected = F.scaled_dot_product_attention(q[:, :, None], keys, values)[:, :, 0].reshape(B, H * Dh)
    out = torch.empty(B, H * Dh, dtype=dtype)
    native_kernels.attention(qkv, cos, sin, cache, position, out)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    others = torch.arange(L) != position
    assert torch.equal(cache[:, :, :, others], expected_cache[:, :, :, others])  # only the new key and value
    torch.testing.assert_close(cache[:, :, :, position].float(), expected_cache[:, :, :, position].float(),
                               atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
    with pytest.raises(ValueError, match="multiples of 16"):
        native_kernels.attention(torch.zeros(B, 3, H, 24), None, None, torch.zeros(2, B, H, L, 24, dtype=dtype),
                                 0, torch.empty(B, H * 24, dtype=dtype))


def test_topk_matches_torch_and_orders_ties_by_index():
    need(torch.float32)
    g = torch.Generator().manual_seed(3)
    for shape, k in [((4, 16384), 2000), ((8, 1000), 1), ((3, 77), 77), ((2, 5), 3)]:
        x = torch.randn(*shape, generator=g)
        values, indices = native_kernels.topk(x, k)
        expected = torch.topk(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices), shape
    x = torch.randint(0, 5, (4, 300), generator=g).float()
    x[:, :40] = float("-inf")
    values, indices = native_kernels.topk(x, 290)                           # reaches into the -inf
    assert torch.equal(values, torch.topk(x, 290).values) and torch.equal(x.gather(1, indices), values)
    ordered = values[:, 1:] < values[:, :-1]
    tied = values[:, 1:] == values[:, :-1]
    assert (ordered | (tied & (indices[:, 1:] > indices[:, :-1]))).all()     # equal values in column order
    with pytest.raises(ValueError, match="k must lie"):
        native_kernels.topk(x, 301)


def test_kernels_share_torchs_openmp_runtime():
    need(torch.float32)
    # a fresh process: loading the kernels must not add an OpenMP runtime (a second thread pool); other
    # packages may bring their own, so the test compares before and after
    script = ("import torch; from stage2_prior import native_kernels as n; before = n._openmp_runtimes(); "
              "assert n.available(torch.float32); after = n._openmp_runtimes(); print(sorted(before), sorted(after)); "
              "assert before and after == before")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_second_openmp_runtime_is_refused(monkeypatch):
    need(torch.float32)
    loaded = iter([{"/torch/lib/libiomp5.so"}, {"/torch/lib/libiomp5.so", "/usr/lib/libgomp.so.1"}])
    monkeypatch.setattr(native_kernels, "_openmp_runtimes", lambda: next(loaded))
    native_kernels.library.cache_clear()
    try:
        assert not native_kernels.available(torch.float32)
        assert "second OpenMP runtime" in native_kernels.unavailable_reason(torch.float32)
    finally:
        native_kernels.library.cache_clear()
        native_kernels._reasons.clear()


def test_results_do_not_depend_on_the_thread_count():
    need(torch.float32)
    g = torch.Generator().manual_seed(4)
    weight, x = torch.randn(200, 64, generator=g), torch.randn(4, 64, generator=g)
    packed, runs = native_kernels.pack(weight), []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = torch.empty(4, 200)
            runs.append((native_kernels.linear(x, packed, 200, None, True, out).clone(),
                         native_kernels.topk(out, 50)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1][1], runs[1][1][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_decode_step_matches_the_torch_step(dtype):
    need(dtype)
    torch.manual_seed(0)
    prior = GPTPrior(PriorConfig(dim=64, depth=2, heads=2, code_shape=(4, 4), vocab_sizes=(40,),
                                 num_classes=3)).eval()
    for norm in prior.modules():  # non-trivial norm gains, so a skipped or misplaced fused norm shows
        if hasattr(norm, "gamma"):
            torch.nn.init.normal_(norm.gamma, 1.0, 0.3)
    native = StaticKVDecoder(prior, 3, weights_dtype=dtype)
    plain = StaticKVDecoder(prior, 3, weights_dtype=dtype, pack_weights=False)
    assert native.native and not plain.native
    tokens = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 40                                                        # a class token
    full = prior.forward_tokens(tokens)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for t in range(16):
        got, want = native.step(tokens[:, t:t + 1]), plain.step(tokens[:, t:t + 1])
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(got, full[:, t], atol=tolerance * 2, rtol=tolerance * 2)
    torch.testing.assert_close(native.cache.float(), plain.cache.float(), atol=tolerance, rtol=tolerance)


def test_switch_off_and_build_failure_fall_back(monkeypatch, tmp_path):
    torch.manual_seed(0)
    prior = GPTPrior(PriorConfig(dim=32, depth=1, heads=2, code_shape=(2, 2), vocab_sizes=(8,))).eval()
    expected = generate(prior, n=2, seed=0, temperature=0.0, use_cache=False)
    builds_here = native_kernels.available(torch.float32)  # else a failing compiler is never reached
    try:
        for variable, value, reason in [("VQGAN_NATIVE_KERNELS", "0", "switched off"),
                                        ("CXX", "false", "building the kernel failed")]:
            monkeypatch.setenv(variable, value)
            monkeypatch.setenv("VQGAN_KERNEL_CACHE", str(tmp_path / variable))  # nothing built there yet
            native_kernels.library.cache_clear()
            native_kernels._reasons.clear()
            if variable == "CXX" and not builds_here:
                continue
            assert not native_kernels.available(torch.float32)
            assert reason in native_kernels.unavailable_reason(torch.float32)
            assert not StaticKVDecoder(prior, 2).native
            assert torch.equal(generate(prior, n=2, seed=0, temperature=0.0), expected)   # torch's operators
            monkeypatch.delenv(variable)
    finally:
        native_kernels.library.cache_clear()
        native_kernels._reasons.clear()
