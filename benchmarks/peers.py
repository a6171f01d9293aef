"""Peers the benchmarks compare against that may be missing from a machine."""
from __future__ import annotations


def torchao_blockwise():
    """torchao's blockwise FP8 Triton kernels (the training recipe's quantizers and GEMM), or None."""
    try:
        from torchao.prototype.blockwise_fp8_training import kernels
        return kernels
    except Exception as e:  # not installed, or built for another torch
        print(f"torchao peer unavailable: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
