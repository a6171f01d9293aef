"""quantd numerics: the format spec, the CPU reference, and the CPU and Triton backends."""
from .dispatch import dequantize, matmul, quantize
from .spec import Format, Granularity, QuantizedTensor, QuantSpec, ScaleEncoding

__all__ = ["Format", "Granularity", "QuantSpec", "QuantizedTensor", "ScaleEncoding", "quantize", "dequantize", "matmul"]
