"""The decode step's CPU kernels (`decode_kernels.cpp`: small-batch matmul, single-query attention,
top-k), compiled at first use and called through ctypes.

The library is built with the system C++ compiler (`$CXX`, else `g++`, else `c++`) into
`$VQGAN_KERNEL_CACHE` (default `~/.cache/vqgan-toolkit/kernels`; the temporary directory where
that is read-only). Its file name carries a hash of the source, the flags and the compiler's
version, so an edited kernel or another compiler never loads a stale library. Building takes about
a second per dtype, once per machine. It needs Linux on x86-64 with AVX-512 (fp32) or AVX-512 BF16
(bf16), and torch's OpenMP build: the kernels run their threads in torch's OpenMP pool. Anywhere
else, with `VQGAN_NATIVE_KERNELS=0`, or when the build fails, `available()` is False and the
decoder uses torch's operators (weights packed for MKL/oneDNN); `unavailable_reason()` says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"]
_DTYPE_FLAGS = {torch.float32: [], torch.bfloat16: ["-mavx512bf16", "-DGEMV_BF16"]}
_CPU_FLAGS = {torch.float32: {"avx512f", "avx512bw", "avx512vl"},
              torch.bfloat16: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}}
_reasons: dict[torch.dtype, str] = {}
_I64, _PTR, _INT, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # the library's functions: argument types (all return void but the first)
    "gemv_packed_numel": [_I64, _I64],
    "gemv_pack": [_PTR, _I64, _I64, _PTR],
    "gemv_linear": [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _INT, _PTR, _I64, _INT, _INT, _INT, _PTR, _FLOAT, _INT],
    "decode_attention": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _FLOAT, _PTR, _INT, _INT],
    "topk_rows": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _INT],
}


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes loaded in this process (Linux), e.g. torch's bundled libgomp."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if re.search(r"/lib(gomp|iomp5|omp)[.-][^/]*$", line)}


def cache_dir() -> Path:
    return Path(os.environ.get("VQGAN_KERNEL_CACHE") or Path.home() / ".cache" / "vqgan-toolkit" / "kernels")


def _build(dtype: torch.dtype, compiler: str, directory: Path) -> Path:
    flags = _BASE_FLAGS + _DTYPE_FLAGS[dtype]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version]).encode()).hexdigest()[:16]
    target = directory / f"decode_{str(dtype).removeprefix('torch.')}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (DDP ranks, test workers) never see half a file
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(built, target)
    return target


@lru_cache(maxsize=None)
def library(dtype: torch.dtype) -> ctypes.CDLL | None:
    """The loaded kernel library for fp32 or bf16, or None (the reason in `unavailable_reason(dtype)`)."""
    reason = None
    if dtype not in _DTYPE_FLAGS:
        reason = f"no kernel for {dtype}"
    elif os.environ.get("VQGAN_NATIVE_KERNELS", "1") == "0":
        reason = "switched off by VQGAN_NATIVE_KERNELS=0"
    elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        reason = f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    elif not _CPU_FLAGS[dtype] <= _cpu_flags():
        reason = f"this CPU lacks {', '.join(sorted(_CPU_FLAGS[dtype] - _cpu_flags()))}"
    elif "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:", 1)[-1].splitlines()[0]:
        reason = "torch's parallel backend is not OpenMP"
    elif (compiler := _compiler()) is None:
        reason = "no C++ compiler found ($CXX, g++ or c++)"
    if reason is None:
        try:
            try:
                path = _build(dtype, compiler, cache_dir())
            except PermissionError:  # a read-only home (some clusters): build in the temporary directory
                path = _build(dtype, compiler, Path(tempfile.gettempdir()) / f"vqgan-kernels-{os.getuid()}")
            runtimes_before = _openmp_runtimes()
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = f"building the kernel failed: {error}"
        else:
            if runtimes_before and len(_openmp_runtimes()) > len(runtimes_before):
                # a torch built on another OpenMP (e.g. conda's libiomp5): two thread pools would fight
                _reasons[dtype] = (f"the kernel would run a second OpenMP runtime beside torch's "
                                   f"({', '.join(sorted(runtimes_before))})")
                return None
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = argtypes, _I64 if name == "gemv_packed_numel" else None
            return lib
    _reasons[dtype] = reason
    return None


def available(dtype: torch.dtype) -> bool:
    return library(dtype) is not None


def unavailable_reason(dtype: torch.dtype) -> str | None:
    library(dtype)
    return _reasons.get(dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """An (N, K) fp32 or bf16 CPU weight in the kernel's tile layout (a flat tensor)."""
    lib = library(weight.dtype)
    if lib is None:
        raise RuntimeError(f"the native decode kernel is unavailable: {unavailable_reason(weight.dtype)}")
    weight = weight.detach().contiguous()
    n, k = weight.shape
    packed = torch.empty(lib.gemv_packed_numel(n, k), dtype=weight.dtype)
    lib.gemv_pack(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, gelu: bool,
           out: torch.Tensor, accumulate: bool = False, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """out (M, n) = act(x (M, K) @ W.T + bias), or out += that with `accumulate` (fp32 out); W packed
    by `pack`. x: contiguous rows, fp32 or the weight's dtype (K even for bf16); `norm` = (weight (K)
    fp32, eps) layer-norms fp32 rows first; bias: fp32 or None; out: contiguous, fp32 or the weight's
    dtype. Nothing is checked here: this is the decode loop's inner call."""
    rows, k = x.shape
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    library(packed.dtype).gemv_linear(
        x.data_ptr(), rows, k, k, packed.data_ptr(), n, None if bias is None else bias.data_ptr(), gelu,
        out.data_ptr(), n, out.dtype == torch.float32, accumulate, x.dtype == torch.float32,
        None if norm_weight is None else norm_weight.data_ptr(), eps, torch.get_num_threads())
    return out


def attention(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, cache: torch.Tensor,
              position: int, out: torch.Tensor) -> torch.Tensor:
    """One new token's attention: qkv (B, 3, H, Dh) fp32 -> out (B, H * Dh) (fp32 or the cache's dtype).

    Rotates the first 2 * len(cos) features of queries and keys (interleaved pairs, x-transformers'
    rotary), writes the key and value at `position` of `cache` (2, B, H, L, Dh), and attends over
    positions 0..position with scale Dh ** -0.5. Dh must be a multiple of 16, at most 256."""
    lib = library(cache.dtype)
    batch, _, heads, dim_head = qkv.shape
    if dim_head % 16 or dim_head > 256:
        raise ValueError(f"the attention kernel takes head sizes that are multiples of 16 up to 256, got {dim_head}")
    rot_dim = 0 if cos is None else 2 * cos.numel()
    lib.decode_attention(qkv.data_ptr(), batch, heads, dim_head, None if cos is None else cos.data_ptr(),
                         None if sin is None else sin.data_ptr(), rot_dim, cache.data_ptr(), cache.shape[3], position,
                         dim_head ** -0.5, out.data_ptr(), out.dtype == torch.float32, torch.get_num_threads())
    return out


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (sorted, largest first) for a 2-D fp32 CPU tensor, equal values in
    column order; about 4x faster at 4 x 16,384 with k = 2,000 (the prior's top-k sampling)."""
    x = x.contiguous()
    rows, v = x.shape
    if not 0 < k <= v:
        raise ValueError(f"k must lie in [1, {v}], got {k}")
    values, indices = x.new_empty(rows, k), torch.empty(rows, k, dtype=torch.long)
    library(torch.float32).topk_rows(x.data_ptr(), rows, v, k, values.data_ptr(), indices.data_ptr(),
                                     torch.get_num_threads())
    return values, indices
