"""Per-block statistics for blocks too large for a register tile (per tensor, per channel, huge groups):
the finite amax of each block (int8_asym: max(x, 0) and max(-x, 0)), by atomic max, which is exact and
order independent, hence deterministic. triton_quantize's kernel reads them (SCALE_STATS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .plans import launch, scratch
from .quantize_plan import bf16_bits, input_view, pow2_ceil
from .spec import _cdiv
from .triton_elements import below_inf, finite_abs, load_fp32


@triton.jit
def _block_stats_kernel(
    x_ptr, stats_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, ITERS, sx_p, sx_r, sx_c,
    TR: tl.constexpr, TC: tl.constexpr, KEEP_R: tl.constexpr, KEEP_C: tl.constexpr, ASYM: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """Per-block finite amax (ASYM: max(x, 0) and max(-x, 0)) by atomic max into zeroed stats.

    A [TR, TC] tile meets at most two blocks along a dim (TR <= BR, TC <= BC) unless that
    dim's blocks are single rows/columns (KEEP_R / KEEP_C), which stay unreduced. A program
    takes ITERS tiles, along the columns if KEEP_R else along the rows, reducing them in
    registers first; ITERS > 1 only where that dim is a single block.
    """
    pid = tl.program_id(0)
    pid_c = pid % TILES_C
    pid_r = (pid // TILES_C) % TILES_R
    p = pid // (TILES_C * TILES_R)
    hi = tl.zeros([TR, TC], tl.float32)
    nlo = tl.zeros([TR, TC], tl.float32)
    for it in range(ITERS):
        if KEEP_R:
            rows = pid_r * TR + tl.arange(0, TR)[:, None]
            cols = (pid_c * ITERS + it) * TC + tl.arange(0, TC)[None, :]
        else:
            rows = (pid_r * ITERS + it) * TR + tl.arange(0, TR)[:, None]
            cols = pid_c * TC + tl.arange(0, TC)[None, :]
        x = load_fp32(x_ptr + p.to(tl.int64) * sx_p + rows.to(tl.int64) * sx_r + cols.to(tl.int64) * sx_c,
                       (rows < R) & (cols < C), BF16_BITS)
        if ASYM:
            hi = tl.maximum(hi, below_inf(x))
            nlo = tl.maximum(nlo, below_inf(-x))
        else:
            hi = tl.maximum(hi, finite_abs(x))
    # Block ids from the first tile: along the looped dim all tiles share one block.
    if KEEP_R:
        rows = pid_r * TR + tl.arange(0, TR)[:, None]
        cols = pid_c * ITERS * TC + tl.arange(0, TC)[None, :]
        bc0 = (pid_c * ITERS * TC) // BC
        br0 = (pid_r * TR) // BR
    else:
        rows = pid_r * ITERS * TR + tl.arange(0, TR)[:, None]
        cols = pid_c * TC + tl.arange(0, TC)[None, :]
        bc0 = (pid_c * TC) // BC
        br0 = (pid_r * ITERS * TR) // BR
    for half in tl.static_range(2 if ASYM else 1):
        v = hi if half == 0 else nlo
        for sr in tl.static_range(1 if KEEP_R else 2):
            for sc in tl.static_range(1 if KEEP_C else 2):
                m = v
                if KEEP_R:
                    brow = rows
                else:
                    m = tl.max(tl.where(rows // BR == br0 + sr, m, 0.0), axis=0, keep_dims=True)
                    brow = br0 + sr + tl.zeros([1, 1], tl.int32)
                if KEEP_C:
                    bcol = cols
                else:
                    m = tl.max(tl.where(cols // BC == bc0 + sc, m, 0.0), axis=1, keep_dims=True)
                    bcol = bc0 + sc + tl.zeros([1, 1], tl.int32)
                tl.atomic_max(stats_ptr + half * NBR * NBC + brow * NBC + bcol, m, mask=(brow < NBR) & (bcol < NBC))



def block_stats(v, br, bc, nbr, nbc, asym: bool, config: KernelConfig) -> torch.Tensor:
    """The statistics of the (P, R, C) view `v`'s blocks of (br, bc): (nbr x nbc) amaxes (asym: twice)."""
    P, R, C = v.shape
    keep_r, keep_c = br == 1, bc == 1
    tc = min(pow2_ceil(C), 256) if keep_c else min(pow2_ceil(C), 256, 1 << (bc.bit_length() - 1))
    tr_cap = max(1, config.stats_tile_elems // tc)
    tr = min(pow2_ceil(R), tr_cap) if keep_r else min(pow2_ceil(R), tr_cap, 1 << (br.bit_length() - 1))
    stats = scratch((2 if asym else 1) * nbr * nbc, torch.float32, v.device)
    tiles_r, tiles_c = _cdiv(R, tr), _cdiv(C, tc)
    # Fewer, longer programs (fewer atomics on one address) where the looped dim is one block.
    iters = 1
    if (bc >= C) if keep_r else (br >= R):
        iters = max(1, min(tiles_c if keep_r else tiles_r, P * tiles_r * tiles_c // config.stats_programs))
        if keep_r:
            tiles_c = _cdiv(tiles_c, iters)
        else:
            tiles_r = _cdiv(tiles_r, iters)
    launch(
        _block_stats_kernel, (P * tiles_r * tiles_c,), input_view(v), stats, R, C, nbr, nbc, br, bc, tiles_r, tiles_c,
        iters, v.stride(0), v.stride(1), v.stride(2), TR=tr, TC=tc, KEEP_R=keep_r, KEEP_C=keep_c, ASYM=asym,
        BF16_BITS=bf16_bits(v), num_warps=config.stats_warps,
    )
    return stats

