"""Linear layers with weights pre-packed once, for the CPU decode loop.

A decode step multiplies a handful of rows by every weight matrix of the prior, so on a CPU it is
bound by how fast the weights stream from memory. `F.linear` re-lays-out the weight for the BLAS
kernels on every call; packing it once into a kernel's own layout is what makes the stream fast.
In order of preference (docs/performance.md has the measurements):
- "native": this package's AVX-512 kernel (`native_kernels`), fp32 or bf16, built at first use. It
  keeps several memory streams per core in flight and reads the weights at close to the machine's
  DRAM bandwidth: on a 2-core Xeon about twice the speed of the two below at 4-8 rows.
- "mkl": MKL's packed GEMM for fp32 (about 8 us fixed cost per call).
- "onednn": oneDNN's for bf16 (about 45 us per call, with the GELU fused).
On other devices, dtypes or builds without these, `PackedLinear` is plain `F.linear`. It checks
once at construction that the packed kernel agrees with `F.linear` and falls back to it when not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stage2_prior import native_kernels

# rows up to which the native kernel runs (it re-reads each weight tile from cache per 4 rows);
# a longer prefill goes to F.linear, whose GEMM is made for many rows
NATIVE_MAX_ROWS = 32


def _packing_backend(weight: torch.Tensor) -> str | None:
    """"native", "mkl" (fp32), "onednn" (bf16) or None where this build or device has no packed kernel."""
    if weight.device.type != "cpu":
        return None
    if native_kernels.available(weight.dtype) and (weight.dtype == torch.float32 or weight.shape[1] % 2 == 0):
        return "native"
    if weight.dtype == torch.float32 and torch.backends.mkl.is_available() \
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and hasattr(torch.ops.mkl, "_mkl_linear"):
        return "mkl"
    if weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "onednn"
    return None


class PackedLinear:
    """y = act(x @ weight.T + bias) with act in {None, "gelu"} (exact erf GELU).

    `rows_hint` is the number of rows per call the packing is tuned for (the decode batch); other
    row counts (a prefill) work too.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                 rows_hint: int = 1, pack: bool = True):
        if activation not in (None, "gelu"):
            raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
        self.weight, self.bias, self.activation = weight.detach(), None if bias is None else bias.detach(), activation
        self.rows, self.packed, self.backend = max(1, rows_hint), None, None
        self.out_features = self.weight.shape[0]
        self.bias_fp32 = None if bias is None else self.bias.float().contiguous()
        backend = _packing_backend(self.weight) if pack else None
        if backend is not None:
            try:
                if backend == "native":
                    packed = native_kernels.pack(self.weight)
                elif backend == "mkl":
                    packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, self.rows)
                else:
                    packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.rows)
                probe = torch.randn(self.rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
                probe = probe.to(weight.dtype)
                expected, got = self._reference(probe), self._packed_call(backend, packed, probe)
                tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
                scale = expected.abs().max().clamp_min(1.0)
                if got.shape == expected.shape and ((got - expected).abs().max() / scale) <= tolerance:
                    self.packed, self.backend = packed, backend
            except (RuntimeError, NotImplementedError, AttributeError):  # this build lacks or refuses the op
                self.packed = None

    @property
    def is_packed(self) -> bool:
        return self.packed is not None

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def _packed_call(self, backend: str, packed: torch.Tensor, x: torch.Tensor,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if backend == "native":
            rows = x.numel() // x.shape[-1]
            out_dtype = out_dtype or self.weight.dtype
            if rows <= NATIVE_MAX_ROWS and x.dtype in (self.weight.dtype, torch.float32) \
                    and out_dtype in (self.weight.dtype, torch.float32):
                out = torch.empty(*x.shape[:-1], self.out_features, dtype=out_dtype)
                native_kernels.linear(x.reshape(rows, x.shape[-1]).contiguous(), packed, self.out_features,
                                      self.bias_fp32, self.activation == "gelu", out.view(rows, self.out_features))
                return out
            return self._reference(x)
        x = x.to(self.weight.dtype)
        if backend == "mkl":  # other row counts than the packed one fall back inside the op
            y = torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, self.rows)
            return F.gelu(y) if self.activation == "gelu" else y
        if self.activation == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """act(x @ weight.T + bias) in `out_dtype` (default: the weight's dtype); x of any float dtype."""
        if self.packed is None:
            y = self._reference(x)
        else:
            y = self._packed_call(self.backend, self.packed, x, out_dtype)
        return y if out_dtype is None else y.to(out_dtype)
