"""NVFP4 quantization (NUMERICS.md, "NVFP4"): the tensor's amax by the per-tensor statistics pass
(triton_block_stats), the tensor scale from it, then one pass of 1x16 blocks read as pairs of elements
(words of two where the layout allows, as triton_mxfp4_pairs reads MXFP4), each byte two E2M1 codes.
triton_quantize.quantize takes it for nvfp4.
"""
from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

from .config import KernelConfig
from .launch import inline_ptx, interpreting
from .plans import launch
from .quantize_plan import (ElementConstants, as_grid, bf16_bits, bytes_of, element_constants, input_view,
                            narrow_launch, pair_words, row_tile_grid)
from .spec import E2M1, E4M3, NVFP4_BLOCK, NVFP4_ZERO_SCALE, QuantizedTensor, QuantSpec, _cdiv
from .triton_block_stats import block_stats
from .triton_elements import (CORRECTED_ANY_ZERO, CORRECTED_MAX, CORRECTED_MIN, DIVIDE, bf16_halves, corrected, e2m1,
                              e4m3_value, encode_float, finite_abs, grid_tile, load_fp32, max_into,
                              max_magnitude_bits, quotient, seen_max)

# E4M3 block scales: rounded by the hardware conversion when compiled, by the integer routine (encode_float's
# soft path) when interpreted (the interpreter's own fp8 cast is not exact).
E4M3_SOFT: ElementConstants = element_constants(QuantSpec("fp8_e4m3"), exact_fp8=True)
E4M3_HW: ElementConstants = element_constants(QuantSpec("fp8_e4m3"), exact_fp8=False)
TENSOR_SCALE_AMAX = tl.constexpr(E4M3.max * E2M1.max)  # the tensor scale's numerator: the largest scaled code
# Tensor scales under which every divisor (E4M3 value / ts) lies in [CORRECTED_MIN, CORRECTED_MAX]: careless.
TS_MAX = tl.constexpr(2.0 ** -9 / CORRECTED_MIN.value)
TS_MIN = tl.constexpr(E4M3.max / CORRECTED_MAX.value)
R6 = tl.constexpr(float(numpy.float32(1.0) / numpy.float32(E2M1.max)))  # RN(1 / 6) (numpy: plans record no torch op)
# The most 1x16 blocks a tile may hold. Compiled by triton 3.6 for sm_90, tiles of 128 blocks or more (32 x 4, 16 x
# 8, 2 x 64, 1 x 128 blocks, at 1, 2 or 4 warps) were seen (H100, 2026-12-07 morning) coding rows whose length in
# words is not a multiple of 16 wrongly under a careless tensor scale (scales right, 5-23 % of the code bytes wrong);
# every tile of 64 blocks or fewer was exact. Later that day (H100, triton 3.6) neither this kernel nor that
# morning's (7804961) reproduced it: 0 wrong bytes over (32, 4, 4), (2, 64, 1), (1, 128, 1) tiles on rows of 500
# and 150 words, words and strided elements, with and without edge cases, own and given scale (BENCHMARKS.md). The
# limit stays while the first observation is unexplained; tests/test_nvfp4.py::test_gpu_tiles_past_the_limit
# holds such tiles to the reference with it lifted.
MAX_TILE_BLOCKS = 64
ZERO_BELOW = tl.constexpr(2.0 ** -10)  # the largest fp32 that E4M3 rounds to 0 (half its least subnormal, a tie)
ZERO_SCALE = tl.constexpr(NVFP4_ZERO_SCALE)  # the scale of a block whose scale rounds to 0


def quantize(v: torch.Tensor, qt: QuantizedTensor, config: KernelConfig, given: torch.Tensor | None = None,
             amax: torch.Tensor | None = None) -> None:
    """Fill qt (codes, scales, tensor_scale allocated for v's tensor) with v (1, R, C) quantized to NVFP4; `given`:
    the tensor scale to use (one fp32), else v's own (reference.nvfp4_tensor_scale of the amax a statistics pass
    finds first); `amax` (a zeroed one-element fp32): receives v's finite amax, found in the quantizing pass. The
    launch: config.nvfp4_launch (narrowed to the rows), nvfp4_maxnreg, packed_encode."""
    _, R, C = v.shape
    rows, groups, warps = narrow_launch(config.nvfp4_launch, _cdiv(C, NVFP4_BLOCK))
    if rows * groups > MAX_TILE_BLOCKS:
        raise ValueError(f"KernelConfig.nvfp4_launch {tuple(config.nvfp4_launch)}: a tile of {rows} x {groups} blocks "
                         f"(at most {MAX_TILE_BLOCKS}: larger tiles were seen miscompiled for sm_90, BENCHMARKS.md)")
    source = given if given is not None else block_stats(v, R, C, 1, 1, False, config)
    grid_s = as_grid(qt.scales, R, _cdiv(C, NVFP4_BLOCK))
    grid, rows_x = row_tile_grid(_cdiv(C, groups * NVFP4_BLOCK), _cdiv(R, rows))
    words = pair_words(v)
    if words is None:  # elements loaded one by one: lo and hi apart
        x, words_kind, sx_r, sx_c = input_view(v), ELEMENTS, v.stride(1), v.stride(2)
    else:
        x, sx_r, sx_c = words, words.stride(0), 1
        words_kind = {torch.bfloat16: BF16_WORDS, torch.float16: FP16_WORDS, torch.float32: FP32_WORDS}[v.dtype]
    compiled = not interpreting()
    packed = inline_ptx() and words_kind is BF16_WORDS and config.packed_encode
    extra = {} if config.nvfp4_maxnreg is None else {"maxnreg": config.nvfp4_maxnreg}
    fmt = E4M3_HW if compiled else E4M3_SOFT
    launch(_nvfp4_kernel, grid, x, bytes_of(qt.codes), bytes_of(grid_s), source, qt.tensor_scale,
           qt.tensor_scale if amax is None else amax, R, C, sx_r, sx_c, (C + 1) // 2, grid_s.stride(0),
           grid_s.stride(1), ROWS=rows, GROUPS=groups, SCALE_FMT=fmt,
           BF16_BITS=bf16_bits(v), WORDS=words_kind.value, FROM_AMAX=given is None,
           AMAX=amax is not None, PACKED=packed, ROWS_X=rows_x, num_warps=warps, **extra)


# WORDS of _nvfp4_kernel: how the input is read.
ELEMENTS = tl.constexpr(0)  # element by element (x_ptr: the elements; BF16_BITS as load_fp32)
BF16_WORDS = tl.constexpr(1)  # int32 words of two bf16 elements (element 2i in the low half)
FP16_WORDS = tl.constexpr(2)  # int32 words of two fp16 elements
FP32_WORDS = tl.constexpr(3)  # int64 words of two fp32 elements


@triton.jit
def _load_pairs(x_ptr, r, j, R, C, C2, sx_r, sx_c, BF16_BITS: tl.constexpr, WORDS: tl.constexpr):
    """(lo, hi) fp32: elements k = 2j and k + 1 of rows r, zero outside the (R, C) matrix (C2 = ceil(C / 2) pairs a
    row: the word mask, which keeps the loads vectorized)."""
    k = 2 * j
    row_ok = r < R
    if WORDS == ELEMENTS:
        ptrs = x_ptr + r.to(tl.int64) * sx_r + k.to(tl.int64) * sx_c
        lo = load_fp32(ptrs, row_ok & (k < C), BF16_BITS)
        hi = load_fp32(ptrs + sx_c, row_ok & (k + 1 < C), BF16_BITS)
    else:
        w = tl.load(x_ptr + r.to(tl.int64) * sx_r + j, mask=row_ok & (j < C2), other=0)
        if WORDS == BF16_WORDS:
            lo, hi = bf16_halves(w)
        elif WORDS == FP16_WORDS:
            lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            lo = w.to(tl.int32).to(tl.float32, bitcast=True)
            hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


def _e2m1_steps_ptx(q: str, code: str) -> str:
    """PTX of _e2m1_words for one quotient register `q`: its code (above it, bits that the byte drops) into `code`."""
    return f"""
        abs.f32 a, {q};
        min.f32 a, a, 0f40C00000;
        fma.rn.f32 y, a, 0f40000000, 0f4B000000;
        add.rn.f32 z, a, 0f4B000002;
        fma.rn.f32 a, a, 0f3F000000, 0f4B000004;
        mov.b32 {code}, y;
        mov.b32 e, z;
        min.u32 {code}, {code}, e;
        mov.b32 e, a;
        min.u32 {code}, {code}, e;"""


def _code_bytes_ptx() -> str:
    """PTX of _e2m1_words, four words at a time ($1-$4 q_lo, $5-$8 q_hi, $9-$12 w; $0 the four bytes): each word's
    codes as lo + 16 * hi, the four gathered into one register (prmt); the signs (bits 15 and 31 of each word, bytes 1
    and 3) spread into whole bytes by prmt's sign replication, gathered as the codes are and masked to bits 3 and 7."""
    codes = "".join(_e2m1_steps_ptx(f"${1 + i}", f"c{i}") + _e2m1_steps_ptx(f"${5 + i}", "d")
                    + f"\n        mad.lo.s32 c{i}, d, 16, c{i};" for i in range(4))
    return """
        {
        .reg .f32 a, y, z;
        .reg .b32 e, d, c0, c1, c2, c3, u, v, s, t;""" + codes + """
        prmt.b32 u, c0, c1, 0x0040;
        prmt.b32 v, c2, c3, 0x0040;
        prmt.b32 c0, u, v, 0x5410;
        prmt.b32 s, $9, $10, 0xFBD9;
        prmt.b32 t, $11, $12, 0xFBD9;
        prmt.b32 u, s, t, 0x5410;
        prmt.b32 v, s, t, 0x7632;
        and.b32 u, u, 0x08080808;
        and.b32 v, v, 0x80808080;
        or.b32 c0, c0, u;
        or.b32 $0, c0, v;
        }
        """


E2M1_WORDS_PTX = tl.constexpr(_code_bytes_ptx())


@triton.jit
def _e2m1_words(q_lo, q_hi, w):
    """The code byte (uint8) of each pair of finite quotients (q_lo, q_hi) of the bf16 elements of int32 word w
    (element 2i in the low nibble, signs from w), in sm_90 PTX (e2m1's rounding, fewer instructions), four words an
    instance.

    E2M1's step is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]. Of a = min(|q|, 6), its code is the least of the
    rounded step counts RN(2a), RN(a) + 2 and RN(a / 2) + 4, each counted from a different binade's code (each is
    the code where its step applies and no less elsewhere; all fp32 a in [0, 6] checked, NUMERICS.md): each by one
    rounding into the low bits of a sum with 2**23 (fma or add), the least taken on the sums' bits. Low and high
    codes add as lo + 16 * hi (bits above the byte dropped), the signs (bits 15 and 31 of w) become bits 3 and 7."""
    return tl.inline_asm_elementwise(asm=E2M1_WORDS_PTX, constraints="=r" + ",r" * 12, args=[q_lo, q_hi, w],
                                     dtype=tl.uint8, is_pure=True, pack=4)


@triton.jit(do_not_specialize=["ss_c"])  # a stride of 1 would make the scales' store a pairs' store, shuffled
def _nvfp4_kernel(x_ptr, codes_ptr, scales_ptr, source_ptr, ts_ptr, amax_ptr, R, C, sx_r, sx_c, sq_r, ss_r, ss_c,
                  ROWS: tl.constexpr, GROUPS: tl.constexpr, SCALE_FMT: tl.constexpr,
                  BF16_BITS: tl.constexpr, WORDS: tl.constexpr, FROM_AMAX: tl.constexpr, AMAX: tl.constexpr,
                  PACKED: tl.constexpr, ROWS_X: tl.constexpr):
    """Codes and E4M3 scales of tiles of ROWS rows x GROUPS 1x16 blocks, read as pairs of elements (lo, hi:
    _load_pairs, words of two where WORDS says so), so that each pair's two codes make one byte (element 2i in the
    low nibble) without moving registers.

    s = E4M3(min(tensor_scale * (amax / 6), 448)) (0.125 if 0), divisor s / tensor_scale, codes of the
    IEEE quotients x / divisor: the reference's steps, each one IEEE fp32 rounding. The quotients (and both ratios
    of a block's divisor, _block_scales) are corrected ones (quotient's CORRECTED_ANY_ZERO: exact wherever a code
    depends on them; a quotient past 2**17, or the NaN an Inf x gives, saturates in e2m1, which takes sign and NaN
    from x) unless the tensor scale is outside [TS_MIN, TS_MAX], where a divisor could leave [CORRECTED_MIN,
    CORRECTED_MAX] (tensors of amax below ~2^-70): then from IEEE divisions. That is decided once for the whole
    tensor: every divisor lies between those of the extreme E4M3 scales, 2**-9 and 448 (division by the tensor
    scale rounds monotonically). AMAX: each tile's finite amax is maxed into amax_ptr. PACKED (bf16 words,
    launch.inline_ptx): _packed_tile. A program finds its tile from its two grid coordinates (ROWS_X: rows along x)."""
    tile_r, tile_c = grid_tile(ROWS_X)
    r = tile_r * ROWS + tl.arange(0, ROWS)[:, None, None]
    g = tile_c * GROUPS + tl.arange(0, GROUPS)[None, :, None]
    j = g * 8 + tl.arange(0, 8)[None, None, :]  # pairs: elements 2j and 2j + 1, code byte j
    # The tile's loads first: the tensor scale's division branches, and loads after a branch wait for it.
    if PACKED:
        w = tl.load(x_ptr + r.to(tl.int64) * sx_r + j, mask=(r < R) & (j < sq_r), other=0)
    else:
        lo, hi = _load_pairs(x_ptr, r, j, R, C, sq_r, sx_r, sx_c, BF16_BITS, WORDS)
    seen = seen_max(amax_ptr) if AMAX else 0.0
    ts = _tensor_scale(source_ptr, FROM_AMAX)
    if (tile_r == 0) & (tile_c == 0):
        tl.store(ts_ptr, ts)
    # Every divisor value / ts (value in [2**-9, 448], each rounded monotonically) lies within the range where ts
    # does; not (in range): a NaN tensor scale is careful too.
    careless = (ts <= TS_MAX) & (ts >= TS_MIN)
    rts = tl.math.div_rn(1.0, ts)
    if PACKED:
        packed, amax = _packed_tile(w, r, g, R, C, ss_r, ss_c, ts, rts, careless, scales_ptr, SCALE_FMT)
    else:
        amax = tl.max(tl.maximum(finite_abs(lo), finite_abs(hi)), axis=2, keep_dims=True)
        packed = _scaled_pairs(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, careless, scales_ptr, SCALE_FMT)
    tl.store(codes_ptr + r.to(tl.int64) * sq_r + j, packed.to(tl.uint8), mask=(r < R) & (j < sq_r))
    if AMAX:  # after the codes, which need no amax: H100 (2026-12-06, 16384^2 bf16, given tensor scale, one process)
        # 0.958-0.963 x copy against 0.955-0.956 before them with an acq_rel atomic
        max_into(amax_ptr, tl.max(tl.max(tl.max(amax, axis=2), axis=1), axis=0), seen)


@triton.jit
def _tensor_scale(source_ptr, FROM_AMAX: tl.constexpr):
    """The tensor scale: the one at source_ptr, or (FROM_AMAX) reference.nvfp4_tensor_scale of the amax there,
    448 * 6 / max(amax, 2**-126), 1.0 where that overflows; evaluated as torch evaluates a number over a tensor
    (and so compressed-tensors): the reciprocal, then the product, each rounded."""
    if FROM_AMAX:
        ts = tl.math.div_rn(1.0, tl.maximum(tl.load(source_ptr), 2.0 ** -126)) * TENSOR_SCALE_AMAX
        return tl.where(ts < float("inf"), ts, 1.0)
    return tl.load(source_ptr)


@triton.jit
def _packed_tile(w, r, g, R, C, ss_r, ss_c, ts, rts, careless, scales_ptr, SCALE_FMT: tl.constexpr):
    """(The code bytes, the blocks' finite amax) of one tile of bf16 words w (its scales stored): the amax reduced on
    the magnitude bits of both halves at once (max.u16x2); a tile without Inf or NaN under a careless tensor scale
    encoded by _e2m1_words, any other by _scaled_pairs."""
    lo, hi = bf16_halves(w)
    mag = max_magnitude_bits(w, 2)
    fast = careless & (tl.max(mag) < 0x7F80)
    if fast:
        amax = (mag << 16).to(tl.float32, bitcast=True)
        divisor = _block_scales(amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT, CORRECTED_ANY_ZERO)
        packed = _e2m1_words(quotient(lo, divisor, CORRECTED_ANY_ZERO), quotient(hi, divisor, CORRECTED_ANY_ZERO), w)
    else:  # an Inf or NaN: the amax of the finite elements
        amax = tl.max(tl.maximum(finite_abs(lo), finite_abs(hi)), axis=2, keep_dims=True)
        packed = _scaled_pairs(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, careless, scales_ptr,
                               SCALE_FMT).to(tl.uint8)
    return packed, amax


@triton.jit
def _scaled_pairs(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, careless, scales_ptr, SCALE_FMT: tl.constexpr):
    """The code byte of each pair (lo, hi) (its blocks' scales from amax stored) by e2m1, which takes sign and NaN
    from the elements (and saturates a NaN quotient of an Inf): careless, by quotient's corrected steps (divisors
    too); else by IEEE divisions (the tensor scale decides for every program alike)."""
    if careless:
        packed = _pairs_by(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT,
                           CORRECTED_ANY_ZERO)
    else:
        packed = _pairs_by(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT, DIVIDE)
    return packed


@triton.jit
def _pairs_by(lo, hi, amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT: tl.constexpr,
              QUOTIENT: tl.constexpr):
    """_scaled_pairs' code bytes, every ratio and quotient by QUOTIENT."""
    divisor = _block_scales(amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT, QUOTIENT)
    return (e2m1(quotient(lo, divisor, QUOTIENT), lo) & 0xF) | ((e2m1(quotient(hi, divisor, QUOTIENT), hi) & 0xF) << 4)


@triton.jit
def _block_scales(amax, r, g, R, C, ss_r, ss_c, ts, rts, scales_ptr, SCALE_FMT: tl.constexpr, QUOTIENT: tl.constexpr):
    """Store the E4M3 scales of the blocks of amax (ROWS, GROUPS, 1) at rows r, blocks g and return their divisors,
    scale / tensor scale. QUOTIENT DIVIDE: both ratios by IEEE division;
    CORRECTED_ANY_ZERO (a careless tensor scale, rts = RN(1 / ts)): by quotient's corrected steps, the same values
    (amax / 6 differs only below 2**-125, where ts <= TS_MAX scales either to an E4M3 zero; value / ts is
    normal, NUMERICS.md)."""
    if QUOTIENT == CORRECTED_ANY_ZERO:
        s = tl.minimum(ts * corrected(amax, 6.0, R6), 448.0)
    else:
        s = tl.minimum(ts * tl.math.div_rn(amax, 6.0), 448.0)
    # the reference's 0.125 for a scale that rounds to 0, taken before the encoding, on the fp32 value (a NaN too,
    # as there): H100 on 96 SMs (2026-12-07) the same time as substituting the encoded zero, 16 instructions fewer
    bits = encode_float(tl.where(s > ZERO_BELOW, s, ZERO_SCALE), SCALE_FMT)
    if SCALE_FMT.EXACT_FP8:
        value = e4m3_value(bits)
    else:  # the hardware's conversion back (exact)
        value = bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    tl.store(scales_ptr + r.to(tl.int64) * ss_r + g * ss_c, bits.to(tl.uint8), mask=(r < R) & (g * 16 < C))
    if QUOTIENT == CORRECTED_ANY_ZERO:
        divisor = corrected(value, ts, rts)
    else:
        divisor = tl.math.div_rn(value, ts)
    return divisor
