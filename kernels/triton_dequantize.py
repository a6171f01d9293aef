"""Triton dequantization kernel, bit-exact with reference.dequantize.

value = code x scale (int8_asym: (code - zero point) x scale) in fp32, cast once to the
output dtype. Tiles use the quantize kernels' block geometry (quantize_plan.block_geometry).
Compiled, fp8 codes are widened by the hardware; interpreted (whose fp8 casts are not
trusted) and for E2M1, codes are decoded from their bits with the format's constants, except into bf16 or
fp16, compiled, where each code byte becomes a half-precision pair: by integer ops and two bf16x2 multiplies
for MXFP4 into bf16 (triton_elements.e2m1x2_scaled, as the MX GEMM decodes its tiles), by fp32 multiplies
and one rounding cvt for NVFP4 and fp16 (e2m1x2_times).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import DEFAULT, KernelConfig
from .launch import inline_ptx, interpreting
from .layout import check_out_values
from .plans import launch, planned
from .quantize_plan import (MAX_REGISTER_BLOCK, Tile, as_grid, block_geometry, bytes_of, pow2_ceil, tile_geometry,
                            warps)
from .spec import E2M1, OUT_DTYPES, QuantizedTensor, ScaleEncoding, _cdiv
from .triton_elements import (IEEE_SPECIALS, NAN_ALL_ONES, NO_SPECIALS, block_ids, decode_minifloat, e2m1x2_scaled,
                              e2m1x2_times, e4m3_value, e8m0_bf16x2, pow2, tile_coords)

@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, zp_ptr, out_ptr,
    ts_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sq_p, sq_r, ss_r, ss_c,
    TILE: tl.constexpr, BLOCKED: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr, UNPACK4: tl.constexpr,
    SPLIT: tl.constexpr, NV: tl.constexpr,
    DECODE_BITS: tl.constexpr, POW2: tl.constexpr, ASYM: tl.constexpr,
    NBITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, SPECIALS: tl.constexpr,
    BF16_BITS: tl.constexpr, WORDS: tl.constexpr = False, F16: tl.constexpr = False, HW_SCALES: tl.constexpr = False,
):
    """Values of one [RB, TBRP, CB, TBCP] tile (TILE: quantize_plan.Tile) over the (P, R, C) view (codes and
    output contiguous).

    BLOCKED: the TBR x TBC sub-tiles are the blocks (one scale each), or SPLIT > 1 of them stacked make
    one block (its rows split across programs); else each element's block is looked up (on rows
    and/or columns: BID_ROWS / BID_COLS).
    DECODE_BITS: codes are raw bits to decode; else the code dtype widens.
    NV (nvfp4): the scales are E4M3 bytes, each block's multiplier their value / the tensor scale at ts_ptr;
    widened by the hardware for HW_SCALES, else decoded from their bits.
    BF16_BITS: round to bf16 on the bits (the interpreter's fp32 -> bf16 cast truncates).
    WORDS (compiled E2M1 codes into a half type, even C): each code byte becomes the half-precision pair of its two
    values (bf16x2, f16x2 for F16), stored as int32 words at out_ptr: MXFP4 into bf16 by bf16 multiplies
    (e2m1x2_scaled), the others by fp32 multiplies rounded once (e2m1x2_times); both the fp32 path's bits.
    """
    RB: tl.constexpr = TILE.RB
    TBRP: tl.constexpr = TILE.TBRP
    CB: tl.constexpr = TILE.CB
    TBC: tl.constexpr = TILE.TBC
    TBCP: tl.constexpr = TILE.TBCP
    p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid = tile_coords(tl.program_id(0), R, C, TILES_R, TILES_C, TILE)
    if BLOCKED:
        brow = (pid_r * RB + rb) // SPLIT
        bcol = pid_c * CB + cb
    else:  # blocks larger than a tile: ids where the block varies, clamped into the grid
        brow, bcol = block_ids(rows, cols, BR, BC, NBR, NBC, BID_ROWS, BID_COLS)
    smask = (brow < NBR) & (bcol < NBC)
    soff = brow.to(tl.int64) * ss_r + bcol.to(tl.int64) * ss_c
    if POW2:
        e8 = tl.load(scales_ptr + soff, mask=smask, other=127).to(tl.int32)
        scale = tl.where(e8 == 255, float("nan"), pow2(e8 - 127))
    elif NV:
        s8 = tl.load(scales_ptr + soff, mask=smask, other=0x38)
        if HW_SCALES:
            value = s8.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            value = e4m3_value(s8.to(tl.int32))
        scale = tl.math.div_rn(value, tl.load(ts_ptr))
    else:
        scale = tl.load(scales_ptr + soff, mask=smask, other=1.0)

    q_base = codes_ptr + p.to(tl.int64) * sq_p + rows.to(tl.int64) * sq_r
    if UNPACK4:  # a code byte holds two elements
        jb = tl.arange(0, TBCP // 2)[None, None, None, :]
        bcols = (pid_c * CB + cb) * (TBC // 2) + jb
        bmask = (rows < R) & (bcols < sq_r)
        packed = tl.load(q_base + bcols, mask=bmask, other=0).to(tl.int32)
    if WORDS:
        if POW2 and not F16:
            w = e2m1x2_scaled(packed, e8m0_bf16x2(e8))
        else:
            w = e2m1x2_times(packed, scale, F16)
        tl.store(out_ptr + p.to(tl.int64) * sq_p + rows.to(tl.int64) * sq_r + bcols, w, mask=bmask)
    else:
        if UNPACK4:
            bits = tl.reshape(tl.join(packed & 0xF, packed >> 4), [RB, TBRP, CB, TBCP])
            v = decode_minifloat(bits, NBITS, EBITS, MBITS, BIAS, SPECIALS)
        elif DECODE_BITS:
            bits = tl.load(q_base + cols, mask=valid, other=0).to(tl.int32)
            v = decode_minifloat(bits, NBITS, EBITS, MBITS, BIAS, SPECIALS)
        else:
            v = tl.load(q_base + cols, mask=valid).to(tl.float32)  # masked lanes are never stored
        if ASYM:
            v = v - tl.load(zp_ptr + soff, mask=smask, other=0).to(tl.float32)
        out = v * scale
        o_base = out_ptr + p.to(tl.int64) * R * C + rows.to(tl.int64) * C
        if BF16_BITS:  # out_ptr is bf16 viewed as int16: round to nearest even on the bits
            b = out.to(tl.int32, bitcast=True)
            out = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
        tl.store(o_base + cols, out.to(out_ptr.dtype.element_ty), mask=valid)


def _specials(el) -> int:
    if not el.has_nan:
        return NO_SPECIALS.value
    return (NAN_ALL_ONES if el.emax + el.bias == (1 << el.ebits) - 1 else IEEE_SPECIALS).value


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *,
               exact_fp8: bool | None = None, config: KernelConfig = DEFAULT,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Values of `qt` in `out_dtype` (default: its spec's), on the codes' device; reference semantics.

    exact_fp8: decode fp8 codes from their bits (True) or by the hardware cast (False);
    default: from bits only when interpreted. config: the launch choices (kernels/config.py).
    out: a contiguous tensor of qt's shape and out_dtype on the codes' device to write (and return).
    """
    spec = qt.spec
    out_dtype = out_dtype or spec.dequant_dtype
    if out_dtype not in OUT_DTYPES.values():
        raise TypeError(f"dequantize: out_dtype {out_dtype} is not supported (expected bfloat16, float16 or float32)")
    if tuple(qt.codes.shape) != tuple(spec.code_shape(qt.shape)):
        raise ValueError(f"dequantize: codes of shape {list(qt.codes.shape)} do not fit a tensor of shape "
                         f"{list(qt.shape)}")
    if out is None:
        out = torch.empty(qt.shape, dtype=out_dtype, device=qt.codes.device)
    else:
        check_out_values(out, qt.shape, out_dtype, qt.codes.device)
    if math.prod(qt.shape) == 0:
        return out
    stored = (qt.codes, qt.scales, qt.zero_points, qt.tensor_scale)
    key = ("dequantize", qt.shape, spec, out_dtype, exact_fp8, config, interpreting(), out.device,
           tuple(None if t is None else (t.shape, t.stride(), t.dtype) for t in stored))
    planned(key, [*stored, out], out.device, lambda: _dequantize_into(qt, out, exact_fp8, config))
    return out


def _dequantize_into(qt: QuantizedTensor, out: torch.Tensor, exact_fp8: bool | None, config: KernelConfig) -> None:
    """Launch the kernel that writes qt's values into out (dequantize's body: a launch on these tensors only)."""
    spec, el, out_dtype = qt.spec, qt.spec.element, out.dtype
    (P, R, C), (br, bc) = block_geometry(qt.shape, spec)
    nbr, nbc = _cdiv(R, br), _cdiv(C, bc)
    exact = interpreting() if exact_fp8 is None else bool(exact_fp8)
    decode_bits = el.kind == "float" and (exact or el is E2M1)
    codes = qt.codes.contiguous()
    codes = bytes_of(codes) if decode_bits else codes
    pow2 = spec.scale_encoding == ScaleEncoding.POW2
    scales = as_grid(qt.scales, nbr, nbc)
    nv = qt.tensor_scale is not None  # nvfp4: E4M3 scales and the tensor scale, divided in the kernel
    scales = bytes_of(scales) if pow2 or nv else scales.float()
    zps = None if qt.zero_points is None else as_grid(qt.zero_points, nbr, nbc)
    if zps is not None and (zps.stride() != scales.stride() or zps.dtype != torch.int8):  # read with scales' strides
        zps = torch.empty_strided(scales.shape, scales.stride(), dtype=torch.int8, device=scales.device).copy_(zps)

    tile, blocked, split, num_warps = launch_geometry(el, R, C, br, bc, config)
    tiles_r, tiles_c = _cdiv(R, tile.RB * tile.TBR), _cdiv(C, tile.CB * tile.TBC)
    ccols = (C + 1) // 2 if el is E2M1 else C
    # E2M1 codes into bf16 or fp16, by PTX: a half-precision pair a code byte (rows of whole words, the output
    # word-aligned)
    words = (el is E2M1 and out_dtype in (torch.bfloat16, torch.float16) and config.packed_decode
             and inline_ptx() and C % 2 == 0 and out.data_ptr() % 4 == 0)
    bf16_bits = interpreting() and out_dtype == torch.bfloat16 and not words
    dest = out.view(torch.int16) if bf16_bits else out.view(torch.int32) if words else out
    launch(
        _dequantize_kernel, (P * tiles_r * tiles_c,), codes, scales, scales if zps is None else zps, dest,
        qt.tensor_scale if nv else scales, R, C, nbr, nbc, br, bc, tiles_r, tiles_c, R * ccols, ccols,
        scales.stride(0), scales.stride(1), TILE=tile, BLOCKED=blocked, BID_ROWS=nbr > 1, BID_COLS=nbc > 1,
        UNPACK4=el is E2M1, SPLIT=split, NV=nv,
        DECODE_BITS=decode_bits, POW2=pow2, ASYM=zps is not None,
        NBITS=el.bits, EBITS=el.ebits, MBITS=el.mbits, BIAS=el.bias, SPECIALS=_specials(el),
        BF16_BITS=bf16_bits, WORDS=words, F16=out_dtype == torch.float16, HW_SCALES=nv and not exact,
        num_warps=num_warps,
    )


def launch_geometry(el, R: int, C: int, br: int, bc: int, config: KernelConfig) -> tuple[Tile, bool, int, int]:
    """(TILE, BLOCKED, SPLIT, warps) of the dequantize launch over the (P, R, C) view of br x bc blocks of
    element type `el` (see _dequantize_kernel)."""
    elems, num_warps = config.dequant_fp4_tile if el is E2M1 else (config.dequant_tile_elems, None)
    blocked = pow2_ceil(br) * pow2_ceil(bc) <= MAX_REGISTER_BLOCK
    if blocked and br == 1 and pow2_ceil(bc) > elems and config.dequant_row_strips:
        blocked = False  # rows longer than a program (channels): strips of them, each looking its row's scale up
    tile, _ = tile_geometry(br, bc, R, C, blocked, config, elems)
    split = 1
    if blocked and tile.RB * tile.CB == 1 and br == tile.TBRP and br % config.dequant_split == 0:
        # Sub-tiles of br / SPLIT rows, SPLIT of them stacked making a block, as many a tile as fit.
        split = config.dequant_split
        tile, _ = tile_geometry(br // split, bc, R, C, True, config, elems)
    return tile, blocked, split, num_warps or warps(tile.elems, config)

