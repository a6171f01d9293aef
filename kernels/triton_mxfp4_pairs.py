"""MXFP4 quantization of 16-bit inputs read as int32 pairs of elements: each word's two codes make one
code byte without reshaping registers. triton_quantize.quantize takes it where the input allows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .launch import inline_ptx
from .plans import launch
from .quantize_plan import as_grid, bytes_of, element_constants, narrow_launch, pair_words, row_tile_grid
from .spec import E2M1, _cdiv
from .triton_elements import (RECIPROCAL, bf16_halves, block_scale, e2m1, finite_abs, grid_tile,
                              max_magnitude_bits, mx_scale_exponent, quotient, stored_scale)


def mxfp4_pairs(v, codes, stored, spec, config: KernelConfig) -> bool:
    """Quantize with _mxfp4_pairs_kernel when `v` (1, R, C) is a 16-bit MXFP4 input it can read as int32 pairs
    (quantize_plan.pair_words); False otherwise."""
    _, R, C = v.shape
    pairs = pair_words(v) if spec.element is E2M1 and v.element_size() == 2 else None
    if pairs is None:
        return False
    grid_s = as_grid(stored, R, _cdiv(C, spec.group_size))
    c2 = C // 2
    rows, groups, warps = narrow_launch(config.mxfp4_pairs_launch, _cdiv(c2, 16))
    grid, rows_x = row_tile_grid(_cdiv(c2, groups * 16), _cdiv(R, rows))
    launch(_mxfp4_pairs_kernel, grid, pairs, bytes_of(codes), bytes_of(grid_s), R, c2, pairs.stride(0),
           grid_s.stride(0), grid_s.stride(1), ROWS=rows, GROUPS=groups, FP16=v.dtype == torch.float16,
           FMT=element_constants(spec), PACKED=v.dtype == torch.bfloat16 and inline_ptx(), ROWS_X=rows_x,
           num_warps=warps)
    return True


@triton.jit
def _e2m1_bf16_pairs(w, e):
    """E2M1 code byte of each int32 word of two bf16 elements (element 2i in the low nibble) under the
    scale 2**e (e in [-127, 127]), in packed bf16x2 arithmetic (sm_90 PTX; no NaN among the elements).

    Per element: q = x * 2**-e, exact but where it falls below bf16's normals (such q code as 0);
    a = min(|q|, 6); the code is the least of the step counts RN(2a), RN(a) + 2 and RN(a / 2) + 4, as NVFP4's
    encoder finds it (triton_nvfp4._e2m1_words, NUMERICS.md), each by one bf16x2 rounding into the low bits of a
    sum with 128 (whose ulp is 1: 128 + k for k < 128), the least taken on the lanes' bits (u16x2 min). The sign
    (bit 15 of the element) adds 8; the high lane's nibble joins the low one's by a shift of 12, which also brings
    bit 14 of the low lane (128's exponent) onto bit 2, taken off first by subtracting 4 (the byte is exact mod 256).
    """
    r = tl.where(e < 127, (127 - e) << 7, 0x40)  # bf16 bits of 2**-e (2**-127 is a subnormal)
    r2 = tl.broadcast_to(r | (r << 16), w.shape)
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 q, a, y, z, h, t, six, two, half, c0, c2, c4;
        mov.b32 six, 0x40C040C0;
        mov.b32 two, 0x40004000;
        mov.b32 half, 0x3F003F00;
        mov.b32 c0, 0x43004300;
        mov.b32 c2, 0x43024302;
        mov.b32 c4, 0x43044304;
        mul.rn.bf16x2 q, $1, $2;
        and.b32 a, q, 0x7FFF7FFF;
        min.u16x2 a, a, six;
        fma.rn.bf16x2 y, a, two, c0;
        add.rn.bf16x2 z, a, c2;
        fma.rn.bf16x2 h, a, half, c4;
        min.u16x2 y, y, z;
        min.u16x2 y, y, h;
        shr.u32 t, $1, 12;
        and.b32 t, t, 0x00080008;
        add.u32 y, y, t;
        sub.u32 y, y, 4;
        shr.u32 t, y, 12;
        add.u32 $0, y, t;
        }
        """,
        constraints="=r,r,r", args=[w, r2], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mxfp4_pairs_kernel(w_ptr, codes_ptr, scales_ptr, R, C2, sw_r, ss_r, ss_c,
                        ROWS: tl.constexpr, GROUPS: tl.constexpr, FP16: tl.constexpr, FMT: tl.constexpr,
                        PACKED: tl.constexpr, ROWS_X: tl.constexpr):
    """MXFP4 codes of a 16-bit (R, 2 * C2) matrix read as int32 pairs of elements: each word's two
    codes make one byte (element 2i in the low nibble) without reshaping registers.

    A program takes ROWS rows x GROUPS MX blocks of 16 words each. The amax is reduced on the
    magnitude bits (16-bit floats order as their bits do). PACKED (bf16, launch.inline_ptx): tiles without
    Inf or NaN are encoded two elements at a time (_e2m1_bf16_pairs); other tiles, fp16 and the
    interpreter go through fp32 and e2m1. A program's tile from its grid coordinates (grid_tile).
    """
    pr, pc = grid_tile(ROWS_X)
    r = pr * ROWS + tl.arange(0, ROWS)[:, None, None]
    g = pc * GROUPS + tl.arange(0, GROUPS)[None, :, None]
    k = g * 16 + tl.arange(0, 16)[None, None, :]
    mask = (r < R) & (k < C2)
    w = tl.load(w_ptr + r.to(tl.int64) * sw_r + k, mask=mask, other=0)
    if PACKED:  # both halves at once (max.u16x2)
        mag = max_magnitude_bits(w, 2)
    else:
        mag = tl.max(tl.maximum(w & 0x7FFF, (w >> 16) & 0x7FFF), axis=2, keep_dims=True)
    if FP16:
        amax = mag.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        careful = tl.max((mag >= 0x7C00).to(tl.int32))  # an Inf or NaN
    else:
        amax = (mag << 16).to(tl.float32, bitcast=True)
        careful = tl.max((mag >= 0x7F80).to(tl.int32))
    s_ptrs = scales_ptr + r.to(tl.int64) * ss_r + g * ss_c
    s_mask = (r < R) & (g * 16 < C2)
    c_ptrs = codes_ptr + r.to(tl.int64) * C2 + k
    if PACKED:
        if careful == 0:
            # The scale's exponent from the amax's bits, as block_scale finds it from the amax.
            e = mx_scale_exponent((mag >> 7) - 127, FMT.EMAX)
            tl.store(s_ptrs, (e + 127).to(tl.uint8), mask=s_mask)
            tl.store(c_ptrs, _e2m1_bf16_pairs(w, e).to(tl.uint8), mask=mask)
        else:
            _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16, FMT)
    else:
        _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16, FMT)


@triton.jit
def _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16: tl.constexpr, FMT: tl.constexpr):
    """Scales and codes of a tile of _mxfp4_pairs_kernel through fp32 and e2m1: the elements of each
    word as fp32 (lo, hi); a careful tile takes the amax of its finite elements."""
    if FP16:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo, hi = bf16_halves(w)
    if careful != 0:
        amax = tl.maximum(tl.max(finite_abs(lo), axis=2, keep_dims=True),
                          tl.max(finite_abs(hi), axis=2, keep_dims=True))
    scale, zp = block_scale(amax, 0.0, FMT)
    tl.store(s_ptrs, stored_scale(scale, FMT.POW2), mask=s_mask)
    # x * 2**-e keeps x's sign (-0 too), NaN and Inf, so each quotient stands for its x in e2m1
    q_lo, q_hi = quotient(lo, scale, RECIPROCAL), quotient(hi, scale, RECIPROCAL)
    packed = (e2m1(q_lo, q_lo) & 0xF) | ((e2m1(q_hi, q_hi) & 0xF) << 4)
    tl.store(c_ptrs, packed.to(tl.uint8), mask=mask)

