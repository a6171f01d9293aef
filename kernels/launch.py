"""Launch helpers shared by the kernels: whether Triton interprets, the SM count, TMA-ready GEMM operands,
the order in which the persistent GEMM programs walk their output tiles, and the sum of a split-K GEMM's partials.

tile_offsets and split_run are plain Python, compiled by triton.jit (triton_gemm) and by gluon.jit
(gluon_gemm): one source for both.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def tile_offsets(tile, num_m, num_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of `tile`, walking GROUP_M row-tiles per column so B tiles stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


def split_run(item, blocks, SPLITS: tl.constexpr, STEP: tl.constexpr):
    """(split, first K block, end K block) of work item `item` of a split-K GEMM: its tile's `blocks` K blocks
    shared out in SPLITS runs of whole STEPs, item % SPLITS taking the run of that index (trailing runs may be
    empty: end == first)."""
    if SPLITS == 1:
        return 0, 0, blocks
    per = ((blocks + SPLITS - 1) // SPLITS + STEP - 1) // STEP * STEP
    split = item % SPLITS
    first = split * per
    return split, first, max(min(first + per, blocks), first)


def interpreting() -> bool:
    """Whether kernels run in the Triton interpreter (TRITON_INTERPRET set, and not to 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def inline_ptx() -> bool:
    """Whether kernels take their paths of inline sm_90 PTX: compiled, or interpreted with a model of that PTX in
    the interpreter's place (tests/ptx_model.py; the interpreter itself cannot run PTX)."""
    if not interpreting():
        return True
    from triton.runtime.interpreter import InterpreterBuilder
    return getattr(InterpreterBuilder.create_inline_asm, "models_ptx", False)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its index, or the current device)."""
    return _properties(device).multi_processor_count


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program of a CUDA device may take (opted in)."""
    return _properties(device).shared_memory_per_block_optin


def _properties(device: torch.device):
    return _device_properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    return torch.cuda.get_device_properties(index)


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


@triton.jit
def _sum_splits_kernel(ws_ptr, c_ptr, sa_ptr, sb_ptr, M, N, stride_cm, stride_cn, stride_sam, stride_sbn,
                       SPLITS: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr):
    """C = the sum of the SPLITS planes (M, N) of ws_ptr, added in plane order (the same bits every run); SCALED:
    of int32 planes, then float(sum) * (sa[row] * sb[column]) (stride 0: one scale)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(ws_ptr + offs, mask=mask, other=0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0)
    row, col = offs // N, offs % N
    if SCALED:
        scale = tl.load(sa_ptr + row * stride_sam, mask=mask, other=1.0) * tl.load(sb_ptr + col * stride_sbn,
                                                                                  mask=mask, other=1.0)
        acc = acc.to(tl.float32) * scale
    tl.store(c_ptr + row * stride_cm + col * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def sum_splits(ws: torch.Tensor, c: torch.Tensor, scales: tuple | None = None) -> torch.Tensor:
    """C (M, N, any strides) = the planes of a split-K GEMM's partials ws (splits, M, N; contiguous) added in order,
    rounded once to C's dtype (triton_gemm and gluon_gemm). scales (sa, stride between rows, sb, stride between
    columns; stride 0: one scale): int32 planes, whose exact sum is scaled as triton_gemm scales an INT8 product."""
    splits, M, N = ws.shape
    sa, stride_sam, sb, stride_sbn = scales or (ws, 0, ws, 0)  # unread without scales
    block = 1024
    _sum_splits_kernel[(triton.cdiv(M * N, block),)](ws, c, sa, sb, M, N, c.stride(0), c.stride(1), stride_sam,
                                                     stride_sbn, SPLITS=splits, BLOCK=block, SCALED=scales is not None)
    return c
