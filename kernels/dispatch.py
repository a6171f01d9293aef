"""Picks a backend: Triton for CUDA tensors, the CPU backend otherwise.

Backends are modules with the same three functions as the reference:
quantize(x, spec, scales), dequantize(qt, out_dtype), matmul(a, b, out_dtype).
"reference" is the specification itself; "triton" on CPU tensors runs under the
Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

import importlib

import torch

from .spec import QuantizedTensor, QuantSpec

_MODULES = {"reference": ".reference", "cpu": ".cpu", "triton": ".triton_backend"}


def backend_module(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name], __package__)


def default_backend(t: torch.Tensor) -> str:
    return "triton" if t.is_cuda else "cpu"


def quantize(x: torch.Tensor, spec: QuantSpec, *, scales: torch.Tensor | None = None,
             backend: str | None = None, scale_layout: str = "row") -> QuantizedTensor:
    """Quantize `x` (bf16/fp16/fp32, any device) with `spec`; `scales` fixes the scales (static quantization).

    scale_layout "col" stores the scales (and zero points) column-major: same logical
    shape, the last dim slowest, as cuBLAS-style GEMMs read them.
    """
    module = backend_module(backend or default_backend(x))
    if getattr(module, "WRITES_SCALE_LAYOUTS", False):
        return module.quantize(x, spec, scales, scale_layout=scale_layout)
    return _with_scale_layout(module.quantize(x, spec, scales), scale_layout)


def quantize_dual(x: torch.Tensor, spec: QuantSpec, *, backend: str | None = None,
                  scale_layout: str = "row") -> tuple[QuantizedTensor, QuantizedTensor]:
    """X (M, K) quantized along its rows and X^T (K, M) quantized along its rows (X's 1 x g and g x 1 blocks).

    The Triton backend reads X once for both; other backends compose
    quantize(x) and quantize(x.T.contiguous()).
    """
    name = backend or default_backend(x)
    module = backend_module(name)
    if hasattr(module, "quantize_dual"):
        return module.quantize_dual(x, spec, scale_layout=scale_layout)
    return (quantize(x, spec, backend=name, scale_layout=scale_layout),
            quantize(x.T.contiguous(), spec, backend=name, scale_layout=scale_layout))


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    return backend_module(backend or default_backend(qt.codes)).dequantize(qt, out_dtype)


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16, *,
           backend: str | None = None) -> torch.Tensor:
    """C = A @ B^T for quantized A (M, K) and B (N, K)."""
    return backend_module(backend or default_backend(a.codes)).matmul(a, b, out_dtype)


SCALE_LAYOUTS = ("row", "col")


def scale_tensor(shape, dtype: torch.dtype, device, layout: str = "row") -> torch.Tensor:
    """An empty scale (or zero-point) tensor of logical `shape`; "col" makes the last dim the slowest."""
    if layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {', '.join(SCALE_LAYOUTS)}, got {layout!r}")
    shape = tuple(shape)
    if layout == "row" or len(shape) < 2:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty((shape[-1],) + shape[:-1], dtype=dtype, device=device).movedim(0, -1)


def _with_scale_layout(qt: QuantizedTensor, layout: str) -> QuantizedTensor:
    """`qt` with its scales and zero points copied into `layout` (values unchanged)."""
    def moved(t):
        if t is None:
            return None
        out = scale_tensor(t.shape, t.dtype, t.device, layout)
        if t.element_size() == 1:  # float8_e8m0fnu has no copy kernel everywhere: copy the bytes
            out.view(torch.uint8).copy_(t.view(torch.uint8))
        else:
            out.copy_(t)
        return out
    if layout == "row":
        return qt
    return QuantizedTensor(qt.codes, moved(qt.scales), qt.spec, qt.shape, moved(qt.zero_points))
