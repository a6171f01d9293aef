"""NVFP4 quantization (NUMERICS.md, "NVFP4"): the tensor's amax by the per-tensor statistics pass
(triton_block_stats), the tensor scale from it, then one pass of 1x16 blocks read as pairs of elements
(words of two where the layout allows, as triton_mxfp4_pairs reads MXFP4), each byte two E2M1 codes.
triton_quantize.quantize takes it for nvfp4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .config import KernelConfig
from .quantize_plan import ElementConstants, as_grid, bf16_bits, bytes_of, element_constants, input_view, pair_words
from .spec import NVFP4_BLOCK, NVFP4_ZERO_SCALE, QuantizedTensor, QuantSpec, _cdiv
from .triton_block_stats import block_stats
from .triton_elements import (CORRECTED_ANY_ZERO, CORRECTED_MAX, CORRECTED_MIN, DIVIDE, e2m1, e4m3_value, encode_float,
                              finite_abs, load_fp32, quotient)

# E4M3 block scales are rounded by the integer routine (encode_float's soft path): exact compiled and
# interpreted alike (the interpreter's own fp8 cast is not).
E4M3_SOFT: ElementConstants = element_constants(QuantSpec("fp8_e4m3"), exact_fp8=True)
ZERO_SCALE_BITS = int(torch.tensor(NVFP4_ZERO_SCALE).to(torch.float8_e4m3fn).view(torch.uint8))


def tensor_scale(v: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    """0-d fp32: reference.nvfp4_tensor_scale of the finite amax of `v` (1, R, C), found by the statistics pass."""
    return reference.nvfp4_tensor_scale(block_stats(v, v.shape[1], v.shape[2], 1, 1, False, config)[0])


def quantize(v: torch.Tensor, qt: QuantizedTensor, config: KernelConfig, given: torch.Tensor | None = None,
             amax: torch.Tensor | None = None) -> None:
    """Fill qt (codes, scales, tensor_scale allocated for v's tensor) with v (1, R, C) quantized to NVFP4; `given`:
    the tensor scale to use (one fp32), else v's own (a statistics pass first); `amax` (a zeroed one-element
    fp32): receives v's finite amax, found in the quantizing pass."""
    _, R, C = v.shape
    qt.tensor_scale.copy_(tensor_scale(v, config) if given is None else given.reshape(()))
    grid_s = as_grid(qt.scales, R, _cdiv(C, NVFP4_BLOCK))
    rows, groups, warps = config.nvfp4_launch
    grid = (_cdiv(R, rows) * _cdiv(C, groups * NVFP4_BLOCK),)
    words = pair_words(v)
    if words is None:  # elements loaded one by one: lo and hi apart
        x, words_kind, sx_r, sx_c = input_view(v), ELEMENTS, v.stride(1), v.stride(2)
    else:
        x, sx_r, sx_c = words, words.stride(0), 1
        words_kind = {torch.bfloat16: BF16_WORDS, torch.float16: FP16_WORDS, torch.float32: FP32_WORDS}[v.dtype]
    _nvfp4_kernel[grid](x, bytes_of(qt.codes), bytes_of(grid_s), qt.tensor_scale,
                        qt.tensor_scale if amax is None else amax, R, C, sx_r, sx_c, (C + 1) // 2,
                        grid_s.stride(0), grid_s.stride(1),
                        ROWS=rows, GROUPS=groups, SCALE_FMT=E4M3_SOFT, ZERO_BITS=ZERO_SCALE_BITS,
                        BF16_BITS=bf16_bits(v), WORDS=words_kind.value, AMAX=amax is not None, num_warps=warps)


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
            lo = (w << 16).to(tl.float32, bitcast=True)
            hi = (w & -65536).to(tl.float32, bitcast=True)
        elif WORDS == FP16_WORDS:
            lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            lo = w.to(tl.int32).to(tl.float32, bitcast=True)
            hi = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _nvfp4_kernel(x_ptr, codes_ptr, scales_ptr, ts_ptr, amax_ptr, R, C, sx_r, sx_c, sq_r, ss_r, ss_c,
                  ROWS: tl.constexpr, GROUPS: tl.constexpr, SCALE_FMT: tl.constexpr, ZERO_BITS: tl.constexpr,
                  BF16_BITS: tl.constexpr, WORDS: tl.constexpr, AMAX: tl.constexpr):
    """Codes and E4M3 scales of ROWS rows x GROUPS 1x16 blocks, read as pairs of elements (lo, hi: _load_pairs,
    words of two where WORDS says so), so that each pair's two codes make one byte (element 2i in the low
    nibble) without moving registers.

    s = E4M3(min(tensor_scale * (amax / 6), 448)) (0.125 if 0), divisor s / tensor_scale, codes of the
    IEEE quotients x / divisor: the reference's steps, each one IEEE fp32 rounding. The quotients are
    corrected ones (quotient's CORRECTED_ANY_ZERO: exact wherever a code depends on them; a quotient past
    2**17, or the NaN an Inf x gives, saturates in e2m1, which takes sign and NaN from x) unless the tensor scale
    allows a divisor outside [CORRECTED_MIN, CORRECTED_MAX] (tensors of amax below ~2^-70): then from IEEE
    divisions. That is decided once for the whole tensor: every divisor lies between those of the extreme E4M3
    scales, 2**-9 and 448 (division by the tensor scale rounds monotonically). AMAX: the tile's finite amax is
    maxed into amax_ptr."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, GROUPS * 16)
    r = (pid // tiles_c) * ROWS + tl.arange(0, ROWS)[:, None, None]
    g = (pid % tiles_c) * GROUPS + tl.arange(0, GROUPS)[None, :, None]
    j = g * 8 + tl.arange(0, 8)[None, None, :]  # pairs: elements 2j and 2j + 1, code byte j
    lo, hi = _load_pairs(x_ptr, r, j, R, C, sq_r, sx_r, sx_c, BF16_BITS, WORDS)
    amax = tl.max(tl.maximum(finite_abs(lo), finite_abs(hi)), axis=2, keep_dims=True)
    ts = tl.load(ts_ptr)
    s = tl.minimum(ts * tl.math.div_rn(amax, 6.0), 448.0)
    bits = encode_float(s, SCALE_FMT)
    bits = tl.where(bits == 0, ZERO_BITS, bits)
    divisor = tl.math.div_rn(e4m3_value(bits), ts)
    b_mask = (r < R) & (g * 16 < C)
    tl.store(scales_ptr + r.to(tl.int64) * ss_r + g * ss_c, bits.to(tl.uint8), mask=b_mask)
    if AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.max(amax, axis=2), axis=1), axis=0))
    # Not (in range): a NaN tensor scale is careful too.
    careless = (tl.math.div_rn(2.0 ** -9, ts) >= CORRECTED_MIN) & (tl.math.div_rn(448.0, ts) <= CORRECTED_MAX)
    if careless:  # e2m1 takes sign and NaN from x and saturates a NaN quotient of an Inf
        packed = (e2m1(quotient(lo, divisor, CORRECTED_ANY_ZERO), lo) & 0xF) | \
            ((e2m1(quotient(hi, divisor, CORRECTED_ANY_ZERO), hi) & 0xF) << 4)
    else:
        packed = (e2m1(quotient(lo, divisor, DIVIDE), lo) & 0xF) | \
            ((e2m1(quotient(hi, divisor, DIVIDE), hi) & 0xF) << 4)
    tl.store(codes_ptr + r.to(tl.int64) * sq_r + j, packed.to(tl.uint8), mask=(r < R) & (j < sq_r))
