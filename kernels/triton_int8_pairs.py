"""INT8 asym quantization of bf16 row groups read as int32 words of two elements (element 2i in the low half):
each block's maximum and minimum reduced on the words, both halves at once (compiled: max.NaN.bf16x2 and
min.NaN.bf16x2, one instruction a word each), and each word's two codes stored as one 16-bit pair.
triton_quantize.quantize takes it where KernelConfig.asym_pairs and the input allow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .launch import interpreting
from .plans import launch, scratch
from .quantize_plan import as_grid, bytes_of, element_constants, narrow_launch, pair_words, persistent_programs
from .spec import Format, Granularity, QuantSpec, _cdiv
from .triton_elements import (CORRECTED_ANY_ZERO, CORRECTED_MAX, CORRECTED_MIN, DIVIDE, bf16_halves, block_scale,
                              defer_tile, encode, encode_quotient, max_nan, min_nan, quotient, store_scales)


def int8_pairs(v: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
               spec: QuantSpec, config: KernelConfig) -> bool:
    """Quantize `v` (1, R, C) into codes, scales and zero points with _int8_pairs_kernel when config.asym_pairs is
    on and `v` is a bf16 INT8 asym input of power-of-two groups it can read as words (quantize_plan.pair_words;
    codes on an even address); False otherwise. Tiles that meet an Inf or NaN or an extreme scale are listed by the
    first launch and quantized by a second (FIXUP)."""
    g = spec.group_size
    if not (config.asym_pairs and spec.format == Format.INT8_ASYM and spec.granularity == Granularity.GROUP
            and v.dtype == torch.bfloat16 and 8 <= g <= config.asym_tile[0] and g & (g - 1) == 0
            and codes.data_ptr() % 2 == 0):
        return False
    words = pair_words(v)
    if words is None:
        return False
    _, R, C = v.shape
    nbc = _cdiv(C, g)
    rows, groups, warps = narrow_launch((1, config.asym_tile[0] // g, config.asym_tile[1]), nbc)
    tiles = _cdiv(R, rows) * _cdiv(nbc, groups)
    careful = scratch(1 + tiles, torch.int32, v.device)  # the careful tiles' count, then their ids
    grid_s, grid_zp = as_grid(scales, R, nbc), as_grid(zero_points, R, nbc)
    args = (words, codes.view(torch.int16), grid_s, bytes_of(grid_zp), careful, R, C // 2, words.stride(0),
            grid_s.stride(0), grid_s.stride(1))
    kwargs = dict(ROWS=rows, GROUPS=groups, WORDS=g // 2, T=group_threads(g // 2), FMT=element_constants(spec),
                  PACKED=not interpreting(), num_warps=warps)
    launch(_int8_pairs_kernel, (tiles,), *args, FIXUP=False, **kwargs)
    launch(_int8_pairs_kernel, (min(tiles, persistent_programs(v.device, config.fixup_programs)),), *args,
           FIXUP=True, **kwargs)
    return True


def group_threads(words: int) -> int:
    """T of _int8_pairs_tile for groups of `words` words (a power of two >= 4): the largest power of two whose square
    divides words / 4."""
    return 1 << ((words // 4).bit_length() - 1) // 2


@triton.jit
def _max_bf16x2(a, b):
    """Maximum of each bf16 half of int32 words, NaN where either is NaN (sm_90 PTX)."""
    return tl.inline_asm_elementwise("max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _min_bf16x2(a, b):
    """Minimum of each bf16 half of int32 words, NaN where either is NaN (sm_90 PTX)."""
    return tl.inline_asm_elementwise("min.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True,
                                     pack=1)


# OP of _group_reduce.
MAX_BF16X2 = tl.constexpr(0)
MIN_BF16X2 = tl.constexpr(1)
MAX_NAN = tl.constexpr(2)
MIN_NAN = tl.constexpr(3)
MAX = tl.constexpr(4)


@triton.jit
def _group_reduce(v, OP: tl.constexpr):
    """v reduced by OP's combine over each group of a [V, B, T, 4] tile (axes 3, 2, 0)."""
    if OP == MAX_BF16X2:
        m = tl.reduce(tl.reduce(tl.reduce(v, 3, _max_bf16x2, keep_dims=True), 2, _max_bf16x2, keep_dims=True), 0,
                      _max_bf16x2, keep_dims=True)
    elif OP == MIN_BF16X2:
        m = tl.reduce(tl.reduce(tl.reduce(v, 3, _min_bf16x2, keep_dims=True), 2, _min_bf16x2, keep_dims=True), 0,
                      _min_bf16x2, keep_dims=True)
    elif OP == MAX_NAN:
        m = tl.reduce(tl.reduce(tl.reduce(v, 3, max_nan, keep_dims=True), 2, max_nan, keep_dims=True), 0, max_nan,
                      keep_dims=True)
    elif OP == MIN_NAN:
        m = tl.reduce(tl.reduce(tl.reduce(v, 3, min_nan, keep_dims=True), 2, min_nan, keep_dims=True), 0, min_nan,
                      keep_dims=True)
    else:
        m = tl.max(tl.max(tl.max(v, axis=3, keep_dims=True), axis=2, keep_dims=True), axis=0, keep_dims=True)
    return m


@triton.jit
def _group_max_min(w, lo, hi, PACKED: tl.constexpr):
    """(max, min) of each group of words w of elements (lo, hi), NaN where the group holds a NaN: PACKED on the words,
    both halves at once, then the larger (smaller) half; else on the fp32 elements."""
    if PACKED:
        top_lo, top_hi = bf16_halves(_group_reduce(w, MAX_BF16X2))
        bottom_lo, bottom_hi = bf16_halves(_group_reduce(w, MIN_BF16X2))
        top = max_nan(top_lo, top_hi)
        bottom = min_nan(bottom_lo, bottom_hi)
    else:
        top = _group_reduce(max_nan(lo, hi), MAX_NAN)
        bottom = _group_reduce(min_nan(lo, hi), MIN_NAN)
    return top, bottom


@triton.jit
def _int8_pairs_kernel(w_ptr, codes_ptr, scales_ptr, zp_ptr, list_ptr, R, C2, sw_r, ss_r, ss_c,
                       ROWS: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr, T: tl.constexpr,
                       FMT: tl.constexpr, PACKED: tl.constexpr, FIXUP: tl.constexpr):
    """INT8 asym codes (as 16-bit pairs), fp32 scales and zero points of tiles of ROWS rows x GROUPS groups of WORDS
    words (2 * WORDS elements); the codes at codes_ptr (int16, C2 a row).

    A tile of finite values under scales in [CORRECTED_MIN, CORRECTED_MAX] is coded from corrected quotients
    without clamps below (encode_quotient FINITE, as triton_quantize codes such tiles); any other tile is listed
    in list_ptr (its count, then the tiles), and FIXUP programs code the listed tiles from the maxima of their
    finite elements and IEEE quotients, as the reference does."""
    if FIXUP:
        for i in range(tl.program_id(0), tl.load(list_ptr), tl.num_programs(0)):
            _int8_pairs_tile(tl.load(list_ptr + 1 + i), w_ptr, codes_ptr, scales_ptr, zp_ptr, list_ptr, R, C2, sw_r,
                             ss_r, ss_c, ROWS, GROUPS, WORDS, T, FMT, PACKED, True)
    else:
        _int8_pairs_tile(tl.program_id(0), w_ptr, codes_ptr, scales_ptr, zp_ptr, list_ptr, R, C2, sw_r, ss_r, ss_c,
                         ROWS, GROUPS, WORDS, T, FMT, PACKED, False)


@triton.jit
def _int8_pairs_tile(pid, w_ptr, codes_ptr, scales_ptr, zp_ptr, list_ptr, R, C2, sw_r, ss_r, ss_c,
                     ROWS: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr, T: tl.constexpr,
                     FMT: tl.constexpr, PACKED: tl.constexpr, CAREFUL: tl.constexpr):
    """Tile `pid`, its words as [V, B, T, 4]: B = ROWS x GROUPS groups, word v * 4 + t * 4V + e of a group at
    [v, b, t, e], T = group_threads(WORDS), V = T or 2T. The compiled layout gives each thread 4 contiguous words (the
    last axis) and puts its threads first along the fastest of the other axes by contiguity, which every one
    of them ties at 1: whichever of V and T it takes first (triton 3.6 takes V, 3.9 T), the threads of a group
    are as few as that axis is long, and a thread holds a group's words in the other, so that each thread
    computes the scales of few groups (two of 1x128 at 64 elements a thread) instead of one a vector."""
    V: tl.constexpr = WORDS // (4 * T)
    tiles_c = tl.cdiv(C2, GROUPS * WORDS)
    b = tl.arange(0, ROWS * GROUPS)[None, :, None, None]
    r = (pid // tiles_c) * ROWS + b // GROUPS
    g = (pid % tiles_c) * GROUPS + b % GROUPS
    k = g * WORDS + tl.arange(0, T)[None, None, :, None] * (4 * V) + tl.arange(0, V)[:, None, None, None] * 4 \
        + tl.arange(0, 4)[None, None, None, :]
    mask = (r < R) & (k < C2)
    w = tl.load(w_ptr + r.to(tl.int64) * sw_r + k, mask=mask, other=0)  # zeros: the range holds 0 anyway
    lo, hi = bf16_halves(w)
    s_ptrs = r.to(tl.int64) * ss_r + g * ss_c
    s_mask = (r < R) & (g * WORDS < C2)
    c_ptrs = codes_ptr + r.to(tl.int64) * C2 + k
    if CAREFUL:  # the range of the finite elements (nlo = max(-x) as -min(x) of the finite ones)
        top = _group_reduce(tl.maximum(tl.where(lo < float("inf"), lo, 0.0), tl.where(hi < float("inf"), hi, 0.0)),
                            MAX)
        nlo = _group_reduce(tl.maximum(tl.where(-lo < float("inf"), -lo, 0.0), tl.where(-hi < float("inf"), -hi, 0.0)),
                            MAX)
        scale, zp = block_scale(tl.maximum(top, 0.0), tl.maximum(nlo, 0.0), FMT)
        store_scales(scales_ptr, zp_ptr, s_ptrs, s_mask, scale, zp, FMT)
        _store_pairs(c_ptrs, mask, encode(lo, scale, zp, FMT, DIVIDE), encode(hi, scale, zp, FMT, DIVIDE))
    else:
        top, bottom = _group_max_min(w, lo, hi, PACKED)
        nlo = -bottom
        scale, zp = block_scale(tl.maximum(top, 0.0), tl.maximum(nlo, 0.0), FMT, CORRECTED_ANY_ZERO)
        wild = (scale < CORRECTED_MIN) | (scale > CORRECTED_MAX) | ~(top < float("inf")) | ~(nlo < float("inf"))
        careful = tl.max(tl.reshape(wild.to(tl.int32), [ROWS * GROUPS]))
        if careful == 0:
            store_scales(scales_ptr, zp_ptr, s_ptrs, s_mask, scale, zp, FMT)
            _store_pairs(c_ptrs, mask, encode_quotient(lo, quotient(lo, scale, CORRECTED_ANY_ZERO), zp, FMT, True),
                         encode_quotient(hi, quotient(hi, scale, CORRECTED_ANY_ZERO), zp, FMT, True))
        else:
            defer_tile(list_ptr, pid)


@triton.jit
def _store_pairs(ptrs, mask, c_lo, c_hi):
    """Store the codes of the words' two elements (int8 bits, element 2i in the low byte) as 16-bit pairs."""
    tl.store(ptrs, ((c_lo & 0xFF) | (c_hi << 8)).to(tl.int16), mask=mask)
