"""quantd numerics: the format spec, the CPU reference, and the CPU and Triton backends."""
from .dispatch import dequantize, matmul, quantize
from .spec import Format, Granularity, QuantizedTensor, QuantSpec, ScaleEncoding
from .compat import (FP8Format, NumericalOverflowError, deepml_block_quantize, dequantize_fp8, fp8_block_quantize,
                     fp8_gemm, quantize_fp8, quantize_fp8_with_overflow_handling)

__all__ = ["Format", "Granularity", "QuantSpec", "QuantizedTensor", "ScaleEncoding", "quantize", "dequantize", "matmul",
           # the seed APIs (kernels/compat.py)
           "FP8Format", "NumericalOverflowError", "deepml_block_quantize", "dequantize_fp8", "fp8_block_quantize",
           "fp8_gemm", "quantize_fp8", "quantize_fp8_with_overflow_handling"]
