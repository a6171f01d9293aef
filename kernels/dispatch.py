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
             backend: str | None = None) -> QuantizedTensor:
    """Quantize `x` (bf16/fp16/fp32, any device) with `spec`; `scales` fixes the scales (static quantization)."""
    return backend_module(backend or default_backend(x)).quantize(x, spec, scales)


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    return backend_module(backend or default_backend(qt.codes)).dequantize(qt, out_dtype)


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16, *,
           backend: str | None = None) -> torch.Tensor:
    """C = A @ B^T for quantized A (M, K) and B (N, K)."""
    return backend_module(backend or default_backend(a.codes)).matmul(a, b, out_dtype)
