"""The Triton backend: quantize/dequantize kernels here, the GEMMs in triton_gemm.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

from .spec import QuantizedTensor, QuantSpec
from .triton_dequantize import dequantize as _dequantize
from .triton_quantize import quantize as _quantize
from .triton_quantize import quantize_dual  # noqa: F401  (dispatch.quantize_dual)

WRITES_SCALE_LAYOUTS = True  # quantize takes scale_layout="row"|"col" itself


def quantize(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, *,
             scale_layout: str = "row") -> QuantizedTensor:
    return _quantize(x, spec, scales, scale_layout=scale_layout)


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _dequantize(qt, out_dtype)


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    from .triton_gemm import matmul as _matmul
    return _matmul(a, b, out_dtype)
