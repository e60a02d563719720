"""Linear layers with weights pre-packed once, for the CPU decode loop.

A decode step multiplies a handful of rows by every weight matrix of the prior, so on a CPU it is
bound by how fast the weights stream from memory. `F.linear` re-lays-out the weight for the BLAS
kernels on every call; packing it once into the kernel's own layout (what inductor's CPU freezing
does) raised the measured weight bandwidth from 8-10 GB/s to 13-17 GB/s on a 2-core Xeon (see
docs/performance.md). fp32 weights go to MKL's packed GEMM (about 8 us fixed cost per call),
bf16 weights to oneDNN's (about 45 us per call, with the GELU fused). On other devices, dtypes or
torch builds without these ops, `PackedLinear` is plain `F.linear`; it checks once at construction
that the packed kernel agrees with `F.linear` and falls back to it when not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def _packing_backend(weight: torch.Tensor) -> str | None:
    """"mkl" (fp32), "onednn" (bf16) or None where this build or device has no packed kernel."""
    if weight.device.type != "cpu":
        return None
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
        backend = _packing_backend(self.weight) if pack else None
        if backend is not None:
            try:
                if backend == "mkl":
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
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def _packed_call(self, backend: str, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if backend == "mkl":  # other row counts than the packed one fall back inside the op
            y = torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, self.rows)
            return F.gelu(y) if self.activation == "gelu" else y
        if self.activation == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self._reference(x)
        return self._packed_call(self.backend, self.packed, x)
