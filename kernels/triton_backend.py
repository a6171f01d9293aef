"""The Triton backend: quantize/dequantize kernels from triton_quantize and triton_dequantize, the GEMMs in triton_gemm.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1). Triton
launches on the current CUDA device, so each function makes its tensors' device current first
(a server on cuda:1 runs its work in threads whose current device is cuda:0).
"""
from __future__ import annotations

import functools

import torch

from . import triton_dequantize, triton_quantize
from .config import DEFAULT, KernelConfig
from .spec import QuantizedTensor

WRITES_SCALE_LAYOUTS = True  # quantize takes scale_layout="row"|"col" itself
TAKES_KERNEL_CONFIG = True  # every function takes config=KernelConfig (kernels/config.py)
TAKES_OUT = True  # quantize, quantize_with_amax and dequantize write into out= tensors themselves


def _on_its_device(fn):
    """fn run with the CUDA device of its first argument (a tensor or a QuantizedTensor) current."""
    @functools.wraps(fn)
    def run(t, *args, **kwargs):
        device = (t.codes if isinstance(t, QuantizedTensor) else t).device
        if device.type != "cuda":
            return fn(t, *args, **kwargs)
        with torch.cuda.device(device):
            return fn(t, *args, **kwargs)
    return run


def _matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16, *,
            config: KernelConfig = DEFAULT) -> torch.Tensor:
    from .triton_gemm import matmul  # loaded when the first GEMM runs
    return matmul(a, b, out_dtype, config=config)


quantize = _on_its_device(triton_quantize.quantize)
quantize_dual = _on_its_device(triton_quantize.quantize_dual)
quantize_with_amax = _on_its_device(triton_quantize.quantize_with_amax)
dequantize = _on_its_device(triton_dequantize.dequantize)
matmul = _on_its_device(_matmul)
