"""Delayed scaling of bf16 inputs read as int32 words: FP8 codes under one given scale and the input's finite amax,
in one read (triton_quantize.quantize_with_amax takes it where the input allows, KernelConfig.delayed_words).

Each word holds two elements (element 2i in the low half): its two codes are one 16-bit store made by one
cvt.rn.satfinite x2 (sm_90 PTX), and the tile's amax is reduced on the magnitude bits of both halves at once
(max.u16x2). A thread holds its elements as words until each pair is coded, half the registers of fp32 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .launch import inline_ptx
from .plans import launch
from .quantize_plan import ElementConstants, as_grid, bytes_of, narrow_launch, pair_words, row_tile_grid
from .spec import Format, Granularity, QuantizedTensor, QuantSpec, _cdiv
from .triton_elements import (CORRECTED, CORRECTED_MAX, CORRECTED_MIN, DIVIDE, GUARDED, bf16_halves, fp8_pairs,
                              grid_tile, max_into, max_magnitude_bits, quotient, seen_max, store_scales)

FP8 = (Format.FP8_E4M3, Format.FP8_E5M2)


def delayed_words(v: torch.Tensor, spec: QuantSpec, given: torch.Tensor, amax: torch.Tensor, qt: QuantizedTensor,
                  fmt: ElementConstants, config: KernelConfig) -> bool:
    """Quantize `v` (1, R, C) into qt with the one given scale, its finite amax maxed into `amax`, by
    _delayed_words_kernel where config.delayed_words is set and the input allows: per tensor FP8, bf16 rows of unit
    stride read as words (quantize_plan.pair_words), codes 2-byte aligned; False otherwise (nothing launched)."""
    if config.delayed_words is None or spec.format not in FP8 or spec.granularity != Granularity.TENSOR:
        return False
    words = pair_words(v) if v.dtype == torch.bfloat16 else None
    codes = bytes_of(qt.codes)
    if words is None or not codes.is_contiguous() or codes.data_ptr() % 2 or codes.numel() % 2:
        return False
    R, C2 = words.shape
    rows, width, warps = narrow_launch(config.delayed_words, C2)
    grid, rows_x = row_tile_grid(_cdiv(C2, width), _cdiv(R, rows))
    launch(_delayed_words_kernel, grid, words, codes.reshape(-1).view(torch.int16), given,
           bytes_of(as_grid(qt.scales, 1, 1)), amax, R, C2, words.stride(0), ROWS=rows, WIDTH=width,
           CHUNK=careful_chunk(width, warps), FMT=fmt, PACKED=inline_ptx(), ROWS_X=rows_x, num_warps=warps)
    return True


def careful_chunk(width: int, warps: int) -> int:
    """CHUNK of _delayed_words_kernel: the words a row its careful tiles are coded in at a time, two a thread."""
    return min(width, 64 * warps)


@triton.jit
def _delayed_words_kernel(w_ptr, codes_ptr, scale_ptr, scales_ptr, amax_ptr, R, C2, sw_r, ROWS: tl.constexpr,
                          WIDTH: tl.constexpr, CHUNK: tl.constexpr, FMT: tl.constexpr, PACKED: tl.constexpr,
                          ROWS_X: tl.constexpr):
    """Codes of a tile of ROWS rows x WIDTH words of a bf16 (R, 2 * C2) matrix read as int32 words, under the one
    scale at scale_ptr (stored to scales_ptr by the first program), and the tile's largest finite |x| maxed into
    amax_ptr (max_into), from the words' magnitude bits (PACKED: max.u16x2, PTX).

    A tile whose amax is finite and whose quotient of it lies below the guard's 2**17, under a scale in
    [CORRECTED_MIN, CORRECTED_MAX] (and FMT.GUARDED), is coded from the words in registers by quotient's CORRECTED
    steps, which hold for all its elements without a select. Any other (an Inf or NaN, a quotient that saturates, a
    scale out of range: the same for every tile) is coded CHUNK words a row at a time, reloaded (from L1), by the
    GUARDED steps or IEEE division, so that its code takes no more registers than the common one's."""
    tile_r, tile_c = grid_tile(ROWS_X)
    r = tile_r * ROWS + tl.arange(0, ROWS)[:, None]
    k = tile_c * WIDTH + tl.arange(0, WIDTH)[None, :]
    mask = (r < R) & (k < C2)
    w_rows = w_ptr + r.to(tl.int64) * sw_r
    w = tl.load(w_rows + k, mask=mask, other=0)
    seen = seen_max(amax_ptr)
    scale = tl.load(scale_ptr)
    if (tile_r == 0) & (tile_c == 0):
        first = tl.arange(0, 1)
        store_scales(scales_ptr, scales_ptr, first, first == 0, scale + tl.zeros([1], tl.float32), 0.0, FMT)
    if PACKED:
        mag = tl.max(max_magnitude_bits(w, 1))
    else:
        mag = tl.max(tl.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF))
    in_range = FMT.GUARDED and (scale >= CORRECTED_MIN) & (scale <= CORRECTED_MAX)
    if mag < 0x7F80:
        m = (mag << 16).to(tl.float32, bitcast=True)
        # every RN(|x| * RN(1 / scale)) <= RN(m * RN(1 / scale)) < 2**17: GUARDED would take the corrected quotient
        # of every element, so CORRECTED gives its codes without the select
        careless = in_range and m * tl.math.div_rn(1.0, scale) < 131072.0
    else:  # an Inf or NaN: the finite elements' magnitude bits
        lo_bits, hi_bits = w & 0x7FFF, (w >> 16) & 0x7FFF
        finite = tl.maximum(tl.where(lo_bits < 0x7F80, lo_bits, 0), tl.where(hi_bits < 0x7F80, hi_bits, 0))
        m = (tl.max(finite) << 16).to(tl.float32, bitcast=True)
        careless = False
    max_into(amax_ptr, m, seen)
    c_ptrs = codes_ptr + r.to(tl.int64) * C2
    if careless:
        lo, hi = bf16_halves(w)
        tl.store(c_ptrs + k, fp8_pairs(quotient(lo, scale, CORRECTED), quotient(hi, scale, CORRECTED), FMT),
                 mask=mask)
    else:
        for c in tl.range(0, WIDTH // CHUNK, loop_unroll_factor=1):
            kc = tile_c * WIDTH + c * CHUNK + tl.arange(0, CHUNK)[None, :]
            mc = (r < R) & (kc < C2)
            lo, hi = bf16_halves(tl.load(w_rows + kc, mask=mc, other=0))
            if in_range:
                q_lo, q_hi = quotient(lo, scale, GUARDED), quotient(hi, scale, GUARDED)
            else:
                q_lo, q_hi = quotient(lo, scale, DIVIDE), quotient(hi, scale, DIVIDE)
            tl.store(c_ptrs + kc, fp8_pairs(q_lo, q_hi, FMT), mask=mc)
