"""The CPU backend: the reference's own functions, compiled."""
from .reference import dequantize, matmul, quantize  # noqa: F401  (compiled fast path to come)
