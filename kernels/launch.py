"""Launch helpers shared by the kernels: whether Triton interprets, the SM count, TMA-ready GEMM operands,
and the order in which the persistent GEMM programs walk their output tiles.

tile_offsets is plain Python, compiled by triton.jit (triton_gemm) and by gluon.jit (gluon_gemm): one
source for both.
"""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl


def tile_offsets(tile, num_m, num_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of `tile`, walking GROUP_M row-tiles per column so B tiles stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


def interpreting() -> bool:
    """Whether kernels run in the Triton interpreter (TRITON_INTERPRET set, and not to 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its index, or the current device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_rows(codes: torch.Tensor, k: int) -> torch.Tensor:
    """2-D codes of logical width `k` (bytes for packed MXFP4) as TMA wants them: unit inner stride,
    16-byte aligned rows and base; other layouts are copied once into a zero-padded buffer (ragged K
    that is not a multiple of 16 bytes)."""
    rows, esize = codes.shape[0], codes.element_size()
    if codes.stride(1) == 1 and (codes.stride(0) * esize) % 16 == 0 and codes.data_ptr() % 16 == 0:
        return codes
    padded = torch.zeros((rows, -(-k * esize // 16) * 16 // esize), dtype=codes.dtype, device=codes.device)
    padded[:, :k] = codes
    return padded
