"""INT8 asym quantization of bf16 row groups (1 x G, G / 2 a power of two) and of 2-D tiles (B x G, B a power of two,
a whole tile in a program) read as int32 pairs of elements: each block's lo and hi reduced on both halves of the
words at once (min / max of bf16x2, sm_90 PTX), each word's two codes stored as one 16-bit word.
triton_quantize.quantize takes it where the input allows and inline PTX runs (launch.inline_ptx); every other INT8
asym input takes _quantize_kernel's register tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .launch import inline_ptx
from .plans import launch
from .quantize_plan import (MAX_REGISTER_BLOCK, as_grid, bytes_of, element_constants, narrow_launch, pair_words,
                            pow2_ceil, row_tile_grid)
from .spec import Format, _cdiv
from .triton_elements import (CORRECTED_ANY_ZERO, DIVIDE, below_inf, bf16_halves, block_scale, corrected_block_scale,
                              encode, encode_quotient, grid_tile, max_nan, min_nan, quotient, store_scales)


def asym_pairs(v, block, qt, spec, config: KernelConfig) -> bool:
    """Quantize with _asym_pairs_kernel when `v` (1, R, C) is a bf16 INT8 asym input that it can read as int32 pairs
    (quantize_plan.pair_words) in blocks (BR, BC) of BC / 2 words a row, a power of two, where inline PTX runs and
    config.asym_pairs_launch is set: row groups (BR 1) under config.asym_pairs_launch, a group within a program's
    elements; 2-D tiles (BR a power of two, at most quantize_plan.MAX_REGISTER_BLOCK elements) a tile row a program,
    config.asym_pairs_tile_elems elements a thread, where that is set. False otherwise."""
    br, bc = block
    words = bc // 2
    launch_ = config.asym_pairs_launch
    if (spec.format != Format.INT8_ASYM or v.dtype != torch.bfloat16 or launch_ is None or bc % 2
            or words & (words - 1) or br & (br - 1) or not inline_ptx()):
        return False
    if (bc > launch_[0]) if br == 1 else (br * bc > MAX_REGISTER_BLOCK or config.asym_pairs_tile_elems is None):
        return False
    pairs = pair_words(v)
    if pairs is None:
        return False
    _, R, C = v.shape
    nbr, nbc = _cdiv(R, br), _cdiv(C, bc)
    rows, groups, warps = launch_geometry(br, bc, nbc, config)
    grid, rows_x = row_tile_grid(_cdiv(nbc, groups), _cdiv(R, rows))
    grid_s, grid_zp = as_grid(qt.scales, nbr, nbc), as_grid(qt.zero_points, nbr, nbc)
    assert grid_s.stride() == grid_zp.stride()  # one layout (scale_tensor) for both
    codes = bytes_of(qt.codes).reshape(R, C).view(torch.int16)
    launch(_asym_pairs_kernel, grid, pairs, codes, grid_s, bytes_of(grid_zp), R, C // 2, pairs.stride(0),
           grid_s.stride(0), grid_s.stride(1), ROWS=rows, GROUPS=groups, WORDS=words,
           PIECE=min(words, config.asym_pairs_piece), FMT=element_constants(spec), ROWS_X=rows_x, BLOCK_ROWS=br,
           num_warps=warps)
    return True


def launch_geometry(br: int, bc: int, nbc: int, config: KernelConfig) -> tuple[int, int, int]:
    """(rows, blocks a row, warps) of an _asym_pairs_kernel program over blocks (br, bc), nbc of them a row: row
    groups (br 1) by config.asym_pairs_launch, narrowed to the row; 2-D tiles a tile row a program, as many tiles as
    the row groups' programs hold elements, config.asym_pairs_tile_elems elements a thread."""
    elems, warps = config.asym_pairs_launch
    if br == 1:
        return narrow_launch((1, elems // bc, warps), nbc)
    groups = max(1, min(pow2_ceil(nbc), elems // (br * bc)))
    return br, groups, max(1, min(16, groups * br * bc // (32 * config.asym_pairs_tile_elems)))


@triton.jit
def max_bf16x2_nan(a, b):
    """Maximum of each bf16 half of int32 words, NaN where either is NaN (sm_90 PTX)."""
    return tl.inline_asm_elementwise("max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def min_bf16x2_nan(a, b):
    """Minimum of each bf16 half of int32 words, NaN where either is NaN (sm_90 PTX)."""
    return tl.inline_asm_elementwise("min.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _asym_pairs_kernel(w_ptr, codes_ptr, scales_ptr, zp_ptr, R, C2, sw_r, ss_r, ss_c, ROWS: tl.constexpr,
                       GROUPS: tl.constexpr, WORDS: tl.constexpr, PIECE: tl.constexpr, FMT: tl.constexpr,
                       ROWS_X: tl.constexpr, BLOCK_ROWS: tl.constexpr = 1):
    """Codes, scales and zero points of a tile of ROWS rows x GROUPS blocks of WORDS int32 words (two bf16 elements
    each, element 2i in the low half) of an (R, 2 * C2) matrix; codes as int16 words (element 2i's in the low byte).
    BLOCK_ROWS: 1, each row its own blocks (row groups); else ROWS, the blocks 2-D tiles of the tile's rows.

    The tile is held as [ROWS, GROUPS, WORDS / PIECE, PIECE]: pieces of PIECE words (32 bytes: whole sectors), a
    block's pieces along axis 2, so that a thread holds many pieces of few blocks and each block's scale is worked
    out by few threads. Each block's hi and lo: bf16x2 max and min with NaN kept, the halves then combined in fp32
    (exact: widening). The rest as _quantize_kernel's register tiles (triton_quantize._register_scales,
    _encode_careless): a tile with an Inf or NaN or a scale outside [CORRECTED_MIN, CORRECTED_MAX] is careful, its
    blocks reduced again over their finite elements and divided exactly (_careful_block);
    any other is encoded from the corrected quotients, unclamped. A program's tile from its grid coordinates
    (grid_tile)."""
    pr, pc = grid_tile(ROWS_X)
    r = pr * ROWS + tl.arange(0, ROWS)[:, None, None, None]
    g = pc * GROUPS + tl.arange(0, GROUPS)[None, :, None, None]
    piece = tl.arange(0, WORDS // PIECE)[None, None, :, None]
    k = g * WORDS + piece * PIECE + tl.arange(0, PIECE)[None, None, None, :]
    mask = (r < R) & (k < C2)  # padding words are zeros, as the reference pads ragged blocks
    w = tl.load(w_ptr + r.to(tl.int64) * sw_r + k, mask=mask, other=0)
    hi_lo, hi_hi = bf16_halves(_block_words(w, False, BLOCK_ROWS > 1))
    lo_lo, lo_hi = bf16_halves(_block_words(w, True, BLOCK_ROWS > 1))
    hi = max_nan(hi_lo, hi_hi)
    nlo = -min_nan(lo_lo, lo_hi)
    scale, zp, wild = corrected_block_scale(hi, nlo, FMT)
    careful = tl.max(wild.to(tl.int32))
    if careful == 0:
        x_lo, x_hi = bf16_halves(w)
        c_lo = encode_quotient(x_lo, quotient(x_lo, scale, CORRECTED_ANY_ZERO), zp, FMT, True)
        c_hi = encode_quotient(x_hi, quotient(x_hi, scale, CORRECTED_ANY_ZERO), zp, FMT, True)
        if BLOCK_ROWS == 1:
            store_scales(scales_ptr, zp_ptr, r.to(tl.int64) * ss_r + g * ss_c, (r < R) & (g * WORDS < C2), scale, zp,
                         FMT)
        else:  # the tiles' scales [1, GROUPS, 1, 1]
            store_scales(scales_ptr, zp_ptr, pr.to(tl.int64) * ss_r + g * ss_c, g * WORDS < C2, scale, zp, FMT)
        tl.store(codes_ptr + r.to(tl.int64) * C2 + k, _code_words(c_lo, c_hi), mask=mask)
    else:  # block by block, loaded again (the tile's words are no longer live: no registers held for this)
        for i in range(ROWS // BLOCK_ROWS):
            for j in range(GROUPS):
                _careful_block(w_ptr, codes_ptr, scales_ptr, zp_ptr, pr * (ROWS // BLOCK_ROWS) + i, pc * GROUPS + j,
                               R, C2, sw_r, ss_r, ss_c, WORDS, BLOCK_ROWS, FMT)


@triton.jit
def _block_words(w, MIN: tl.constexpr, OVER_ROWS: tl.constexpr):
    """The bf16x2 max (MIN: min) of each block's words, NaN kept, over its pieces (OVER_ROWS: and the rows). (The
    combine function cannot be an argument: triton 3.6's tl.reduce takes no constexpr-wrapped jit function.)"""
    if MIN:
        m = tl.reduce(tl.reduce(w, 3, min_bf16x2_nan, keep_dims=True), 2, min_bf16x2_nan, keep_dims=True)
        if OVER_ROWS:
            m = tl.reduce(m, 0, min_bf16x2_nan, keep_dims=True)
    else:
        m = tl.reduce(tl.reduce(w, 3, max_bf16x2_nan, keep_dims=True), 2, max_bf16x2_nan, keep_dims=True)
        if OVER_ROWS:
            m = tl.reduce(m, 0, max_bf16x2_nan, keep_dims=True)
    return m


@triton.jit
def _code_words(c_lo, c_hi):
    """The int16 words of code pairs (int32 two's complement codes, c_lo in the low byte)."""
    return ((c_lo & 0xFF) | (c_hi << 8)).to(tl.int16)


@triton.jit
def _careful_block(w_ptr, codes_ptr, scales_ptr, zp_ptr, brow, group, R, C2, sw_r, ss_r, ss_c, WORDS: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, FMT: tl.constexpr):
    """Codes, scale and zero point of block (brow, group) of a careful tile, rows brow * BLOCK_ROWS ..: hi and lo
    over its finite elements, the quotients by IEEE division (as _quantize_kernel's careful tiles). A 2-D block in
    chunks of rows, loaded twice (few registers: the kernel's count is the most any of its paths takes)."""
    CHUNK: tl.constexpr = min(BLOCK_ROWS, 8)
    k = group * WORDS + tl.arange(0, WORDS)[None, :]
    hi = 0.0  # (the maxima below are clamped at 0 either way)
    nlo = 0.0
    for r0 in range(0, BLOCK_ROWS, CHUNK):
        x_lo, x_hi, _, _ = _chunk(w_ptr, brow * BLOCK_ROWS + r0, k, R, C2, sw_r, CHUNK)
        hi = tl.maximum(hi, tl.maximum(tl.max(below_inf(x_lo)), tl.max(below_inf(x_hi))))
        nlo = tl.maximum(nlo, tl.maximum(tl.max(below_inf(-x_lo)), tl.max(below_inf(-x_hi))))
    scale, zp = block_scale(hi, nlo, FMT)
    store_scales(scales_ptr, zp_ptr, brow.to(tl.int64) * ss_r + group * ss_c,
                 (brow * BLOCK_ROWS < R) & (group * WORDS < C2), scale, zp, FMT)
    for r0 in range(0, BLOCK_ROWS, CHUNK):
        x_lo, x_hi, row, mask = _chunk(w_ptr, brow * BLOCK_ROWS + r0, k, R, C2, sw_r, CHUNK)
        codes = _code_words(encode(x_lo, scale, zp, FMT, DIVIDE), encode(x_hi, scale, zp, FMT, DIVIDE))
        tl.store(codes_ptr + row.to(tl.int64) * C2 + k, codes, mask=mask)


@triton.jit
def _chunk(w_ptr, first_row, k, R, C2, sw_r, CHUNK: tl.constexpr):
    """(low elements, high elements, rows, mask) of words k of rows first_row .. + CHUNK - 1 (zeros past R, C2)."""
    row = first_row + tl.arange(0, CHUNK)[:, None]
    mask = k < tl.where(row < R, C2, 0)
    x_lo, x_hi = bf16_halves(tl.load(w_ptr + row.to(tl.int64) * sw_r + k, mask=mask, other=0))
    return x_lo, x_hi, row, mask
