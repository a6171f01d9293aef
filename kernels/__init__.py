"""quantd numerics: the format spec, the CPU reference, and the CPU and Triton backends.

The dispatcher's functions and the seed APIs load on first use, so that importing quantd.kernels.spec
or a backend does not import the dispatcher (which imports the backends).
"""
import importlib

from .spec import Format, Granularity, QuantizedTensor, QuantSpec, ScaleEncoding

_LAZY = {"quantize": ".dispatch", "dequantize": ".dispatch", "matmul": ".dispatch",
         "quantize_with_amax": ".dispatch", "amax": ".reference", "tensor_scale": ".reference",
         # the seed APIs (kernels/compat.py)
         "FP8Format": ".compat", "NumericalOverflowError": ".compat", "deepml_block_quantize": ".compat",
         "dequantize_fp8": ".compat", "fp8_block_quantize": ".compat", "fp8_gemm": ".compat",
         "quantize_fp8": ".compat", "quantize_fp8_with_overflow_handling": ".compat"}

__all__ = ["Format", "Granularity", "QuantSpec", "QuantizedTensor", "ScaleEncoding", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
