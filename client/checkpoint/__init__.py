"""Hugging Face model folders in the layouts serving stacks load (hf-fp8, compressed-tensors, gpt-oss-mxfp4)."""
from .convert import (convert_checkpoint, dequantize_checkpoint, inspect_checkpoint, limit_malloc_arenas, plan,
                      quantize_checkpoint)
from .profiles import PROFILES, detect

__all__ = ["PROFILES", "detect", "convert_checkpoint", "dequantize_checkpoint", "inspect_checkpoint", "limit_malloc_arenas",
           "plan", "quantize_checkpoint"]
