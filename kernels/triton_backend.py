"""The Triton backend: quantize/dequantize kernels from triton_quantize and triton_dequantize, the GEMMs in triton_gemm.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch

from .spec import QuantizedTensor
from .triton_dequantize import dequantize  # noqa: F401
from .triton_quantize import quantize, quantize_dual  # noqa: F401  (quantize takes scale_layout itself)

WRITES_SCALE_LAYOUTS = True  # quantize takes scale_layout="row"|"col" itself


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    from .triton_gemm import matmul as _matmul  # loaded when the first GEMM runs
    return _matmul(a, b, out_dtype)
