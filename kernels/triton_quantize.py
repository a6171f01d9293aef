"""The Triton quantize kernel and its launcher, bit-exact with kernels/reference.py.

`_quantize_kernel` loads a 4-D register tile [RB, BRP, CB, BCP] (RB x CB blocks, each padded to powers
of two; the launch geometry is quantize_plan's), reduces each block's amax in registers and writes codes
and scales in one read of X. With DUAL (quantize_dual) it also writes the transposed, column-wise
quantized copy, from a second load of the tile that hits L2. When a block is too large for registers
(per tensor, per channel, huge groups) or the scales are given, it reads per-block statistics
(triton_block_stats) or scales instead. MXFP4 inputs of 16-bit pairs take triton_mxfp4_pairs, bf16 INT8 asym row
groups triton_asym_pairs.

Under the Triton interpreter the float -> fp8 cast is wrong, so EXACT_FP8 computes fp8 codes with the
reference's integer grid arithmetic; compiled kernels use the hardware cast (both are checked against
the reference on the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference, triton_nvfp4
from .config import DEFAULT, KernelConfig
from .layout import check_out, copy_into, scale_tensor, with_scale_layout
from .launch import interpreting
from .plans import launch, planned, scratch
from .quantize_plan import (MAX_REGISTER_BLOCK, DualPlan, Tile, as_grid, bf16_bits, block_view, bytes_of,
                            element_constants, input_view, persistent_programs, pow2_ceil, schedule, tile_geometry,
                            warps)
from .spec import Format, Granularity, QuantizedTensor, QuantSpec, _cdiv
from .triton_block_stats import block_stats
from .triton_elements import (CORRECTED, CORRECTED_ANY_ZERO, CORRECTED_MAX, CORRECTED_MIN, DIVIDE, GUARDED,
                              RECIPROCAL, below_inf, block_ids, block_scale, corrected_block_scale, defer_tile, encode,
                              encode_quotient, finite_abs, finite_amax, fp8_words, load_fp32, max_into, max_nan,
                              min_nan, prefetch_lines, quotient, rint_int32, seen_max, store_scales, tile_coords,
                              widen_fp32)
from .triton_asym_pairs import asym_pairs
from .triton_delayed_words import delayed_words
from .triton_mxfp4_pairs import mxfp4_pairs

# SCALE_SRC of _quantize_tile: where a block's scale comes from.
SCALE_REGISTER = tl.constexpr(0)  # the tile's sub-tiles are the blocks; reduced in registers
SCALE_STATS = tl.constexpr(1)  # per-block statistics of triton_block_stats
SCALE_GIVEN = tl.constexpr(2)  # given fp32 scales
SCALE_GIVEN_AMAX = tl.constexpr(3)  # given fp32 scales; the input's finite amax atomically maxed into stats_ptr
# TILE_MODE of _quantize_tile (SCALE_REGISTER only).
MANY_BLOCKS = tl.constexpr(0)
ONE_BLOCK = tl.constexpr(1)  # the tile is one block
DEFERRED = tl.constexpr(2)  # careful tiles (of one block or many) left to a FIXUP launch


@triton.jit
def _blocks_max(v, NAN: tl.constexpr = False, NAN_COMBINE: tl.constexpr = True, MIN: tl.constexpr = False):
    """Max (MIN: min) of v over each block of a [RB, TBRP, CB, TBCP] tile (axes 1 and 3). NaN is ignored, as
    max ignores it; NAN: NaN wherever the block holds one, by a NaN-propagating combine (NAN_COMBINE: max.NaN,
    the same instruction count) or by a count of NaN (ElementConstants.NAN_COMBINE)."""
    if NAN and NAN_COMBINE and MIN:
        m = tl.reduce(tl.reduce(v, 3, min_nan, keep_dims=True), 1, min_nan, keep_dims=True)
    elif NAN and NAN_COMBINE:
        m = tl.reduce(tl.reduce(v, 3, max_nan, keep_dims=True), 1, max_nan, keep_dims=True)
    else:
        if MIN:
            m = tl.min(tl.min(v, axis=3, keep_dims=True), axis=1, keep_dims=True)
        else:
            m = tl.max(tl.max(v, axis=3, keep_dims=True), axis=1, keep_dims=True)
        if NAN:
            m = tl.where(_blocks_max((v != v).to(tl.float32)) > 0, float("nan"), m)
    return m


@triton.jit
def _register_scales(x, FMT: tl.constexpr, DEFER: tl.constexpr = False, DIVIDE_RATIO: tl.constexpr = False):
    """(scale, zero point, careful) of the blocks of a register tile (see _blocks_max).

    The amax (ASYM: hi and -lo) is first reduced over all elements, one max an element, NaN kept. careful
    (a scalar) is 1 where that met an Inf or NaN, or some scale of the tile is outside
    [CORRECTED_MIN, CORRECTED_MAX] (scales, and ASYM's zero points, by block_scale's corrected steps, exact for
    a tile that is not careful): then the amax is reduced again over the finite elements only,
    as the reference does, and the codes are divided exactly. So a tile that is not careful holds finite
    values only, and its int8 quotients need no clamp (|x| <= amax: |x / scale| <= 127 * (1 + 2**-23) under
    scale = RN(amax / 127)) and no select for NaN. DEFER: a careful tile is left to another
    launch (DEFERRED of _quantize_tile), so its scales are not reduced again here. DIVIDE_RATIO: the scales by
    block_scale's IEEE divisions instead of its corrected steps (the same values).
    """
    scale, zp, wild = _wild_scales(x, FMT, DIVIDE_RATIO)
    careful = tl.max(wild.to(tl.int32))
    if careful != 0 and not DEFER:
        if FMT.ASYM:
            hi = _blocks_max(below_inf(x))
            nlo = _blocks_max(below_inf(-x))
        else:
            hi = _blocks_max(finite_abs(x))
            nlo = 0.0
        scale, zp = block_scale(tl.maximum(hi, 0.0), tl.maximum(nlo, 0.0), FMT)
    return scale, zp, careful


@triton.jit
def _wild_scales(x, FMT: tl.constexpr, DIVIDE_RATIO: tl.constexpr = False):
    """(scale, zero point, wild) of the blocks of a register tile, as _register_scales finds them first: wild
    (a block's) where its amax met an Inf or NaN or its scale is outside [CORRECTED_MIN, CORRECTED_MAX]."""
    if FMT.ASYM:  # nlo = max(-x) as -min(x): Triton's -x is 0 - x, an add an element
        hi = _blocks_max(x, True, FMT.NAN_COMBINE)
        nlo = -_blocks_max(x, True, FMT.NAN_COMBINE, MIN=True)
    else:
        hi = _blocks_max(tl.abs(x), True, FMT.NAN_COMBINE)
        nlo = 0.0
    return corrected_block_scale(hi, nlo, FMT, DIVIDE if DIVIDE_RATIO else CORRECTED_ANY_ZERO)


@triton.jit
def _encode_careless(x, scale, zp, FMT: tl.constexpr):
    """Codes of a tile that is not careful (see _register_scales: its values are finite): a power-of-two scale
    by its reciprocal, any other by the corrected quotient (int8, with one zero, need not keep the sign of -0);
    INT8 sym rounded only, asym without the clamp before rounding."""
    if FMT.POW2:
        bits = encode(x, scale, zp, FMT, RECIPROCAL)
    elif FMT.IS_INT and not FMT.ASYM:
        bits = rint_int32(quotient(x, scale, CORRECTED_ANY_ZERO))
    elif FMT.IS_INT:
        bits = encode_quotient(x, quotient(x, scale, CORRECTED_ANY_ZERO), zp, FMT, True)
    else:
        bits = encode(x, scale, zp, FMT, CORRECTED)
    return bits


@triton.jit
def _encode_register(x, scale, zp, careful, FMT: tl.constexpr):
    """encode with the scales of _register_scales of a tile of many blocks: a power-of-two scale by
    its reciprocal, any other by the corrected quotient unless the tile is careful. Only the fp32
    quotient is chosen under the branch and encoded after it (INT8 sym: saturated under the careful branch,
    so that after it every quotient is only rounded: 14.4 SASS instructions an element on the common path
    against 18.4 with a clamp and a NaN select after the branch, benchmarks/sass.py), except for INT8 asym,
    whose codes are encoded under it (_encode_careless). Programs of one block branch around the store too
    (_quantize_tile)."""
    if FMT.POW2:
        bits = encode(x, scale, zp, FMT, RECIPROCAL)
    elif FMT.ASYM:
        if careful == 0:
            bits = _encode_careless(x, scale, zp, FMT)
        else:
            bits = encode(x, scale, zp, FMT, DIVIDE)
    else:
        if careful == 0:  # int8 has one zero: its quotient need not keep the sign of -0
            q = quotient(x, scale, CORRECTED_ANY_ZERO if FMT.IS_INT else CORRECTED)
        else:
            q = quotient(x, scale, DIVIDE)
            if FMT.IS_INT:  # saturated, NaN to 0, as encode_quotient's int8 sym codes
                q = tl.where(q != q, 0.0, tl.minimum(tl.maximum(q, -FMT.QMAX), FMT.QMAX))
        bits = rint_int32(q) if FMT.IS_INT else encode_quotient(x, q, zp, FMT)
    return bits


@triton.jit
def _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, TILE: tl.constexpr,
                 PACK4: tl.constexpr):
    """Store a tile's code bits, contiguous over (P, R, C) (PACK4: two nibbles a byte along C)."""
    q_base = codes_ptr + p.to(tl.int64) * sq_p + rows.to(tl.int64) * sq_r
    if PACK4:
        # Element 2i in the low nibble: shift odd elements up and add the pairs (disjoint bits).
        nib = tl.reshape(bits & 0xF, [TILE.RB, TILE.TBRP, TILE.CB, TILE.TBCP // 2, 2]) \
            << (4 * tl.arange(0, 2))[None, None, None, None, :]
        packed = tl.sum(nib, axis=4)
        jb = tl.arange(0, TILE.TBCP // 2)[None, None, None, :]
        bcols = (pid_c * TILE.CB + cb) * (TILE.TBC // 2) + jb
        bmask = (rows < R) & (bcols < sq_r)  # sq_r = ceil(C / 2) code bytes a row
        tl.store(q_base + bcols, packed.to(tl.uint8), mask=bmask)
    else:
        tl.store(q_base + cols, bits.to(tl.uint8), mask=valid)


@triton.jit
def _quantize_tile(
    pid,
    x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr,
    R, C, NBR, NBC, BR, BC, TILES_R, TILES_C,
    sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c,
    TILE: tl.constexpr, FMT: tl.constexpr, SCALE_SRC: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr,
    PACK4: tl.constexpr, BF16_BITS: tl.constexpr, TILE_MODE: tl.constexpr = MANY_BLOCKS,
    SCALES_EACH: tl.constexpr = 1,
):
    """Codes (and scales) of one [RB, TBRP, CB, TBCP] tile (TILE: quantize_plan.Tile; FMT: the format's
    quantize_plan.ElementConstants).

    The tile holds RB x CB sub-tiles of TBR x TBC elements (padded to TBRP x TBCP).
    SCALE_SRC SCALE_REGISTER: sub-tiles are the blocks; their scales are reduced here.
    SCALE_SRC SCALE_STATS: scales come from per-block stats (amax, or hi and -lo) in stats_ptr.
    SCALE_SRC SCALE_GIVEN: scales are given (fp32) in given_ptr; SCALE_GIVEN_AMAX: the same, and the tile's
    largest finite |x| is maxed into stats_ptr (one fp32, zeroed), so delayed scaling reads the input once.
    (The last three look blocks up by row and/or column ids: BID_ROWS / BID_COLS; tile `pid` writes the
    scales of SCALES_EACH blocks.)
    Codes are written contiguously over (P, R, C) (PACK4: two nibbles a byte along C).
    TILE_MODE (SCALE_REGISTER): ONE_BLOCK: the tile is one block (RB = CB = 1), encoded under the careful branch;
    DEFERRED: careful tiles (of one block or many) are only listed, for a FIXUP launch; MANY_BLOCKS: neither.
    """
    RB: tl.constexpr = TILE.RB
    CB: tl.constexpr = TILE.CB
    p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid = tile_coords(pid, R, C, TILES_R, TILES_C, TILE)
    x_base = x_ptr + p.to(tl.int64) * sx_p
    x = load_fp32(x_base + rows.to(tl.int64) * sx_r + cols.to(tl.int64) * sx_c, valid, BF16_BITS)
    if SCALE_SRC == SCALE_GIVEN_AMAX:  # issued with x's loads (max_into)
        seen = seen_max(stats_ptr)

    if SCALE_SRC == SCALE_REGISTER:
        brow = pid_r * RB + rb  # [RB, 1, 1, 1]
        bcol = pid_c * CB + cb  # [1, 1, CB, 1]
        scale, zp, careful = _register_scales(x, FMT, TILE_MODE == DEFERRED, FMT.TILE_DIVIDE and RB * CB == 1)
        store_scales(scales_ptr, zp_ptr, brow.to(tl.int64) * ss_r + bcol.to(tl.int64) * ss_c,
                      (brow < NBR) & (bcol < NBC), scale, zp, FMT)
    else:
        # Blocks larger than a sub-tile: look the blocks up, on 1-D row and column ids where the
        # block varies (BID_ROWS / BID_COLS), clamped so that padding lanes read a real block.
        brow, bcol = block_ids(rows, cols, BR, BC, NBR, NBC, BID_ROWS, BID_COLS)
        bid = brow * NBC + bcol
        if SCALE_SRC == SCALE_STATS:
            if FMT.ASYM:
                scale, zp = block_scale(tl.load(stats_ptr + bid), tl.load(stats_ptr + NBR * NBC + bid), FMT)
            else:
                scale, zp = block_scale(tl.load(stats_ptr + bid), 0.0, FMT)
        else:
            scale = tl.load(given_ptr + bid)
            zp = 0.0
            if SCALE_SRC == SCALE_GIVEN_AMAX:  # exact and order independent: maxima of non-negative floats
                # before the codes: E4M3 per tensor, 16384^2 bf16, H100 (2026-12-06, one process) 0.987 x copy
                # against 0.947 after them (and 0.977 with the volatile read here and an acq_rel atomic)
                max_into(stats_ptr, finite_amax(tl.reshape(x, [TILE.RB * TILE.TBRP * TILE.CB * TILE.TBCP])), seen)
        # The scales of blocks pid * SCALES_EACH .. + SCALES_EACH - 1 (flat over the NBR x NBC grid): each
        # block's by one tile, as a short vector (not masked over the tile's elements).
        sb = pid * SCALES_EACH + tl.arange(0, SCALES_EACH)
        s_mask = sb < NBR * NBC
        if SCALE_SRC == SCALE_STATS:
            if FMT.ASYM:
                own, own_zp = block_scale(tl.load(stats_ptr + sb, mask=s_mask, other=0.0),
                                          tl.load(stats_ptr + NBR * NBC + sb, mask=s_mask, other=0.0), FMT)
            else:
                own, own_zp = block_scale(tl.load(stats_ptr + sb, mask=s_mask, other=0.0), 0.0, FMT)
        else:
            own = tl.load(given_ptr + sb, mask=s_mask, other=1.0)
            own_zp = 0.0
        store_scales(scales_ptr, zp_ptr, (sb // NBC).to(tl.int64) * ss_r + (sb % NBC).to(tl.int64) * ss_c, s_mask,
                      own, own_zp, FMT)

    if SCALE_SRC == SCALE_REGISTER and TILE_MODE == DEFERRED:
        # Careful tiles are left to a second launch (FIXUP of _quantize_kernel) over the list in
        # stats_ptr (their count, then their ids), so that these programs need no registers for them.
        if careful == 0:
            bits = _encode_careless(x, scale, zp, FMT)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, TILE, PACK4)
        else:
            defer_tile(stats_ptr, pid)
    elif SCALE_SRC == SCALE_REGISTER and TILE_MODE == ONE_BLOCK and not FMT.POW2:
        # One block a program: the codes are encoded and stored under the branch (faster on an H100
        # than a store after it, and the form that matched the reference there: BENCHMARKS.md).
        if careful == 0:
            bits = _encode_careless(x, scale, zp, FMT)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, TILE, PACK4)
        else:
            bits = encode(x, scale, zp, FMT, DIVIDE)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, TILE, PACK4)
    else:
        if SCALE_SRC == SCALE_REGISTER:
            bits = _encode_register(x, scale, zp, careful, FMT)
        elif FMT.POW2 and SCALE_SRC == SCALE_STATS:  # given scales need not be powers of two even when stored as E8M0
            bits = encode(x, scale, zp, FMT, RECIPROCAL)
        elif FMT.GUARDED:
            if tl.max(((scale < CORRECTED_MIN) | (scale > CORRECTED_MAX)).to(tl.int32)) == 0:
                bits = encode(x, scale, zp, FMT, GUARDED)
            else:
                bits = encode(x, scale, zp, FMT, DIVIDE)
        else:
            bits = encode(x, scale, zp, FMT, DIVIDE)
        _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, TILE, PACK4)


@triton.jit
def _dual_tile(pid, x_ptr, codes_ptr, scales_ptr, zp_ptr, list_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr, R, C, NBC,
               TILES_C, sx_r, sx_c, sq_r, ss_r, ss_c, sst_r, sst_c, TILE: tl.constexpr, FMT: tl.constexpr,
               BF16_BITS: tl.constexpr, TILE_MODE: tl.constexpr, PLAN: tl.constexpr):
    """quantize_dual's tile `pid` of X (R, C): RB = TBC rows x CB groups of TBC, quantized along its rows (1 x TBC
    groups) into codes and scales, and along its columns, each column one group of X^T's row, into codes_t (C, R),
    scales_t and zp_t, from a second load of the tile (an L2 hit), laid out as X^T's rows [CB * TBC, 1, 1, RB] so
    that it is reduced and encoded like the rows and stored along X^T's rows (faster on an H100 and an H200 than
    reducing the first load's registers along the columns and transposing the codes, BENCHMARKS.md). PLAN
    (quantize_plan.DualPlan): the rows, then the columns, a 1 / SLABS slab at a time, so that a thread holds a slab's
    elements only; PREFETCH: each slab's load issued before the previous slab is coded (KernelConfig.dual_prefetch);
    COLS > 0: the columns' slabs laid out with each column's rows across a warp's lanes (_dual_load). TILE_MODE
    DEFERRED: a tile with a careful row or column is listed for the FIXUP launch (which codes it in place), its
    careful slabs' codes left unwritten; LATE: every slab coded as if careless, the tile's careful blocks counted once,
    at its end (two reductions over the CTA instead of one a slab)."""
    LATE: tl.constexpr = PLAN.LATE and TILE_MODE == DEFERRED
    pid_c = pid % TILES_C
    pid_r = pid // TILES_C
    careful_any = 0
    if PLAN.L2:
        if sx_c == 1:
            prefetch_lines(x_ptr, pid_r * TILE.RB, TILE.RB, pid_c * TILE.CB * TILE.TBC, TILE.CB * TILE.TBC, R, C, sx_r)
    slab = _dual_load(x_ptr, pid_r, pid_c, 0, R, C, sx_r, sx_c, TILE, PLAN)
    for s in tl.static_range(2 * PLAN.SLABS):  # the rows' slabs, then the columns' (laid out as X^T's rows)
        if PLAN.PREFETCH:  # the next slab's load issued before this slab's stores, which loads may not pass
            if s + 1 < 2 * PLAN.SLABS:
                ahead = _dual_load(x_ptr, pid_r, pid_c, s + 1, R, C, sx_r, sx_c, TILE, PLAN)
        raw, rows, bcol, cols, valid = slab
        x = widen_fp32(raw, BF16_BITS)
        if LATE:
            scale, zp, wild = _wild_scales(x, FMT)
            careful = 0
        else:
            scale, zp, careful = _register_scales(x, FMT, TILE_MODE == DEFERRED)
        if s < PLAN.SLABS:
            store_scales(scales_ptr, zp_ptr, rows.to(tl.int64) * ss_r + bcol.to(tl.int64) * ss_c,
                         (rows < R) & (bcol < NBC), scale, zp, FMT)
            _store_dual_codes(codes_ptr + rows.to(tl.int64) * sq_r + cols, valid, x, scale, zp, careful, FMT,
                              TILE_MODE, False)
        else:  # rows: X^T's columns (the tile's rows), cols: X^T's rows
            offsets = cols.to(tl.int64) * sst_r + pid_r * sst_c
            if PLAN.COLS > 0:  # from the lanes of the tile's first row, in the layout the slab was loaded in
                first = (rows == pid_r * TILE.RB) & (cols < C)
                zp_first = zp
                if FMT.ASYM:
                    zp_first = _swapped(tl.broadcast_to(zp, first.shape))
                store_scales(scales_t_ptr, zp_t_ptr, _swapped(offsets + 0 * rows), _swapped(first),
                             _swapped(tl.broadcast_to(scale, first.shape)), zp_first, FMT)
            else:
                store_scales(scales_t_ptr, zp_t_ptr, offsets, cols < C, scale, zp, FMT)
            if PLAN.WORDS:  # X^T's rows a word: the layout the slab was loaded in, four rows a word along axis 3
                wrows = pid_r * (TILE.RB // 4) \
                    + tl.arange(0, PLAN.ROWS)[:, None, None, None] * (TILE.RB // PLAN.ROWS // 4) \
                    + tl.arange(0, TILE.RB // PLAN.ROWS // 4)[None, None, None, :]
                wcols = _swapped(cols)
                _store_dual_words(codes_t_ptr.to(tl.pointer_type(tl.int32)) + wcols.to(tl.int64) * (R // 4) + wrows,
                                  (wrows < R // 4) & (wcols < C), x, scale, careful, FMT, TILE_MODE)
            else:
                _store_dual_codes(codes_t_ptr + cols.to(tl.int64) * R + rows, valid, x, scale, zp, careful, FMT,
                                  TILE_MODE, PLAN.COLS > 0)
        if LATE:  # the wild blocks of the rows' slabs and of the columns' apart
            if s == 0:
                wild_rows = wild
            elif s < PLAN.SLABS:
                wild_rows = wild_rows | wild
            elif s == PLAN.SLABS:
                wild_cols = wild
            else:
                wild_cols = wild_cols | wild
        else:
            careful_any = careful_any | careful
        if s + 1 < 2 * PLAN.SLABS:
            if PLAN.PREFETCH:
                slab = ahead
            else:
                slab = _dual_load(x_ptr, pid_r, pid_c, s + 1, R, C, sx_r, sx_c, TILE, PLAN)
    if LATE:
        careful_any = tl.max(wild_rows.to(tl.int32)) | tl.max(wild_cols.to(tl.int32))
    if TILE_MODE == DEFERRED:
        if careful_any != 0:
            defer_tile(list_ptr, pid)


@triton.jit
def _dual_load(x_ptr, pid_r, pid_c, s: tl.constexpr, R, C, sx_r, sx_c, TILE: tl.constexpr, PLAN: tl.constexpr):
    """(loaded elements, rows, blocks, columns, mask) of slab s of a dual tile (PLAN: quantize_plan.DualPlan): s <
    SLABS, a slab of its rows [RB / SLABS, 1, CB, G]; else slab s - SLABS of its columns, laid out as X^T's rows [CB *
    G / SLABS, 1, 1, RB] (blocks: 0). COLS > 0: a columns' slab is loaded as [L, W / V, V, RB / L] (V =
    min(W, COLS) columns side by side in a thread, L = ROWS (at most RB) rows across lanes, row l * RB / L + j: Triton
    puts the lanes on the first axis after the contiguous one, the warps on the next), then viewed with its first two
    axes swapped, [W / V, L, V, RB / L] (tl.permute: no data moves), X^T's rows along axes 0 and 2: each column's
    rows lie in one warp (reductions in registers and by shuffles) and its codes in the load's layout
    (_store_dual_codes swaps back)."""
    SLABS: tl.constexpr = PLAN.SLABS
    if s < SLABS:
        rows = pid_r * TILE.RB + s * (TILE.RB // SLABS) + tl.arange(0, TILE.RB // SLABS)[:, None, None, None]
        bcol = pid_c * TILE.CB + tl.arange(0, TILE.CB)[None, None, :, None]
        cols = bcol * TILE.TBC + tl.arange(0, TILE.TBC)[None, None, None, :]
    else:
        width: tl.constexpr = TILE.CB * TILE.TBC // SLABS
        first = pid_c * TILE.CB * TILE.TBC + (s - SLABS) * width
        bcol = 0
        if PLAN.COLS > 0:
            L: tl.constexpr = PLAN.ROWS
            V: tl.constexpr = PLAN.COLS if width > PLAN.COLS else width
            rows = pid_r * TILE.RB + tl.arange(0, L)[:, None, None, None] * (TILE.RB // L) \
                + tl.arange(0, TILE.RB // L)[None, None, None, :]
            cols = first + tl.arange(0, width // V)[None, :, None, None] * V + tl.arange(0, V)[None, None, :, None]
        else:
            rows = pid_r * TILE.RB + tl.arange(0, TILE.RB)[None, None, None, :]
            cols = first + tl.arange(0, width)[:, None, None, None]
    valid = (rows < R) & (cols < C)
    raw = tl.load(x_ptr + rows.to(tl.int64) * sx_r + cols.to(tl.int64) * sx_c, mask=valid, other=0)
    if s >= SLABS and PLAN.COLS > 0:
        raw = tl.permute(raw, (1, 0, 2, 3))
        rows = tl.permute(rows, (1, 0, 2, 3))
        cols = tl.permute(cols, (1, 0, 2, 3))
        valid = tl.permute(valid, (1, 0, 2, 3))
    return raw, rows, bcol, cols, valid


@triton.jit
def _store_dual_codes(ptrs, mask, x, scale, zp, careful, FMT: tl.constexpr, TILE_MODE: tl.constexpr,
                      BACK: tl.constexpr):
    """Store the codes of a dual slab: DEFERRED, only where it is not careful; else encoded in place. BACK: a slab
    that _dual_load viewed with axes 0 and 1 swapped (COLS > 0), stored swapped back (the layout it was loaded in)."""
    if TILE_MODE == DEFERRED:
        if careful == 0:
            _store_slab(ptrs, _encode_careless(x, scale, zp, FMT).to(tl.uint8), mask, BACK)
    else:
        _store_slab(ptrs, _encode_register(x, scale, zp, careful, FMT).to(tl.uint8), mask, BACK)


@triton.jit
def _store_dual_words(ptrs, mask, x, scale, careful, FMT: tl.constexpr, TILE_MODE: tl.constexpr):
    """_store_dual_codes of a columns' slab (COLS > 0, fp8) four codes a word: the codes of four consecutive rows of
    X^T's row (the slab's last axis) made into one 32-bit word (fp8_words: by the hardware cast, two cvt of pairs)
    and stored at the int32 pointers `ptrs` (the layout the slab was loaded in, a word every 4 rows), where the
    cast of the whole slab pairs neighbours along X's rows, whose bytes are then moved apart (PRMT) to be stored
    along X's columns. Needs R a multiple of 4 (DualPlan.WORDS): a word's four rows are in or out together, its
    address aligned. Quotients and codes as _encode_careless and _encode_register's."""
    if FMT.POW2:
        q = quotient(x, scale, RECIPROCAL)
    elif TILE_MODE == DEFERRED:
        q = quotient(x, scale, CORRECTED)
    elif careful == 0:
        q = quotient(x, scale, CORRECTED)
    else:
        q = quotient(x, scale, DIVIDE)
    words = _swapped(fp8_words(q, FMT))
    if TILE_MODE == DEFERRED:
        if careful == 0:
            tl.store(ptrs, words, mask=mask)
    else:
        tl.store(ptrs, words, mask=mask)


@triton.jit
def _store_slab(ptrs, codes, mask, BACK: tl.constexpr):
    """tl.store of a dual slab's codes; BACK: pointers, codes and mask with axes 0 and 1 swapped back first."""
    if BACK:
        tl.store(_swapped(ptrs), _swapped(codes), mask=_swapped(mask))
    else:
        tl.store(ptrs, codes, mask=mask)


@triton.jit
def _swapped(t):
    """t with its axes 0 and 1 swapped (a view: _dual_load's columns' slabs back in the layout they were loaded in)."""
    return tl.permute(t, (1, 0, 2, 3))


@triton.jit
def _tile(
    pid,
    x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr,
    R, C, NBR, NBC, BR, BC, TILES_R, TILES_C,
    sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r, sst_c,
    TILE: tl.constexpr, FMT: tl.constexpr, SCALE_SRC: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr,
    DUAL: tl.constexpr, PACK4: tl.constexpr, BF16_BITS: tl.constexpr, TILE_MODE: tl.constexpr,
    SCALES_EACH: tl.constexpr, DUAL_PLAN: tl.constexpr,
):
    """_dual_tile (DUAL) or _quantize_tile of tile `pid`."""
    if DUAL:
        _dual_tile(pid, x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr, R, C,
                   NBC, TILES_C, sx_r, sx_c, sq_r, ss_r, ss_c, sst_r, sst_c, TILE, FMT, BF16_BITS, TILE_MODE,
                   DUAL_PLAN)
    else:
        _quantize_tile(pid, x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, R, C, NBR, NBC, BR, BC,
                       TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, TILE, FMT, SCALE_SRC, BID_ROWS,
                       BID_COLS, PACK4, BF16_BITS, TILE_MODE, SCALES_EACH)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr,
    R, C, NBR, NBC, BR, BC, TILES_R, TILES_C,
    sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r, sst_c,
    TILE: tl.constexpr, FMT: tl.constexpr, SCALE_SRC: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr,
    DUAL: tl.constexpr, PACK4: tl.constexpr, BF16_BITS: tl.constexpr, TILE_MODE: tl.constexpr = MANY_BLOCKS,
    SCALES_EACH: tl.constexpr = 1, NUM_TILES=1, STAGES: tl.constexpr = 0, FIXUP: tl.constexpr = False,
    DUAL_PLAN: tl.constexpr = DualPlan(),
):
    """_tile of tile program_id(0) (STAGES 0), or of tiles pid, pid + programs, ... < NUM_TILES with the loads of
    the next STAGES - 1 tiles in flight (persistent programs). FIXUP: of the tiles listed in stats_ptr by a launch
    with DEFERRED, each program taking every programs-th."""
    if FIXUP:
        for i in range(tl.program_id(0), tl.load(stats_ptr), tl.num_programs(0)):
            _tile(tl.load(stats_ptr + 1 + i), x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr,
                  scales_t_ptr, zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r, ss_r,
                  ss_c, sst_r, sst_c, TILE, FMT, SCALE_SRC, BID_ROWS, BID_COLS, DUAL, PACK4, BF16_BITS, TILE_MODE,
                  SCALES_EACH, DUAL_PLAN)
    elif STAGES == 0:
        _tile(tl.program_id(0), x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr,
              zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r,
              sst_c, TILE, FMT, SCALE_SRC, BID_ROWS, BID_COLS, DUAL, PACK4, BF16_BITS, TILE_MODE, SCALES_EACH,
              DUAL_PLAN)
    else:
        for tile in tl.range(tl.program_id(0), NUM_TILES, tl.num_programs(0), num_stages=STAGES):
            _tile(tile, x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr,
                  zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r,
                  sst_c, TILE, FMT, SCALE_SRC, BID_ROWS, BID_COLS, DUAL, PACK4, BF16_BITS, TILE_MODE, SCALES_EACH,
                  DUAL_PLAN)


def flat_scales(scales: torch.Tensor) -> torch.Tensor:
    """Explicit scales (checked by reference.check_input) as a flat contiguous fp32 tensor."""
    return scales.float().reshape(-1).contiguous()


def quantize(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, *,
             scale_layout: str = "row", exact_fp8: bool | None = None,
             config: KernelConfig = DEFAULT, amax: torch.Tensor | None = None,
             out: QuantizedTensor | None = None) -> QuantizedTensor:
    """Quantize `x` (bf16/fp16/fp32, CUDA or, interpreted, CPU) with `spec`; reference semantics.

    scales: explicit fp32 scales of shape spec.scale_shape (static quantization), on x's device or on the CPU: scales
    on a GPU are checked by reading them back, which waits for the work queued before; CPU scales are checked where
    they are and copied without that wait.
    scale_layout: "row" (row-major) or "col" (the last scale dim slowest).
    exact_fp8: force (True) or forbid (False) integer fp8 encoding; default: only when interpreted.
    config: the launch choices (kernels/config.py).
    amax: with `scales`, a zeroed one-element fp32 tensor on x's device that receives reference.amax(x), found in
    the same pass.
    out: the tensors to write (row scale layout; spec.storage's shapes and dtypes, contiguous, on x's device),
    returned; else they are allocated.
    """
    host_scales = scales is not None and scales.device != x.device and scales.device.type == "cpu"
    reference.check_input(x, spec, None if host_scales else scales)
    if host_scales:
        reference.check_scales(scales, spec, x.shape)  # on the host: no wait for the GPU's queue
        scales = scales.to(x.device, non_blocking=True)
    given = None if scales is None else flat_scales(scales)
    if out is not None:
        if scale_layout != "row":
            raise ValueError("quantize: out takes the row scale layout")
        check_out(out, spec, x.shape, x.device)
    if x.numel() == 0:
        qt = with_scale_layout(_to_device(reference.quantize(x.cpu(), spec, None if scales is None else scales.cpu()),
                                          x.device), scale_layout)
        return qt if out is None else copy_into(out, qt)
    qt = _empty(x.shape, spec, x.device, scale_layout) if out is None else out
    v, block = block_view(x, spec)  # a copy where no view fits (flat blocks of a strided tensor): made before the plan
    key = ("quantize", x.shape, v.shape, v.stride(), x.dtype, x.device, spec, scale_layout, exact_fp8, config,
           interpreting(), given is None, amax is None)
    planned(key, [v, given, amax, qt.codes, qt.scales, qt.zero_points, qt.tensor_scale], x.device,
            lambda: _quantize_into(v, block, spec, given, amax, qt, exact_fp8, config))
    return qt


def _quantize_into(v, block, spec, given, amax, qt, exact_fp8, config) -> None:
    """Launch the kernels that quantize v, x's (P, R, C) view of blocks `block`, into qt (quantize's body: launches on
    these tensors only)."""
    fmt = element_constants(spec, exact_fp8, config.guarded_quotient, config.one_block_divide)
    br, bc = block
    P, R, C = v.shape
    nbr, nbc = _cdiv(R, br), _cdiv(C, bc)
    if spec.format == Format.NVFP4:
        triton_nvfp4.quantize(v, qt, config, given, amax)
        return
    if given is None and mxfp4_pairs(v, qt.codes, qt.scales, spec, config):
        return
    if given is None and asym_pairs(v, block, qt, spec, config):
        return
    if amax is not None and delayed_words(v, spec, given, amax, qt, fmt, config):
        return
    register = given is None and P == 1 and pow2_ceil(br) * pow2_ceil(bc) <= MAX_REGISTER_BLOCK
    stats = None
    if given is None and not register:
        stats = block_stats(v, br, bc, nbr, nbc, fmt.ASYM, config)
    grid_zp = None if qt.zero_points is None else as_grid(qt.zero_points, nbr, nbc)
    _launch(v, qt.codes, as_grid(qt.scales, nbr, nbc), grid_zp, stats, given, br, bc, nbr, nbc, register, fmt, spec,
            config, amax=None if given is None else amax)


def quantize_with_amax(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor, *, scale_layout: str = "row",
                       exact_fp8: bool | None = None, config: KernelConfig = DEFAULT,
                       out: QuantizedTensor | None = None):
    """(quantize(x, spec, scales), reference.amax(x)) from one read of x: the amax of delayed scaling."""
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    qt = quantize(x, spec, scales, scale_layout=scale_layout, exact_fp8=exact_fp8, config=config, amax=amax,
                  out=out)
    return qt, amax.reshape(())


def _empty(shape, spec: QuantSpec, device, scale_layout: str) -> QuantizedTensor:
    """The outputs of quantizing a tensor of `shape`, allocated (spec.storage), scales in `scale_layout`."""
    store = spec.storage(shape)
    zps = None if store.zero_points is None else scale_tensor(*store.zero_points, device, scale_layout)
    ts = None if store.tensor_scale is None else torch.empty(store.tensor_scale[0], dtype=torch.float32, device=device)
    return QuantizedTensor(torch.empty(store.codes[0], dtype=store.codes[1], device=device),
                           scale_tensor(*store.scales, device, scale_layout), spec, tuple(shape), zps, ts)


def _launch(v, codes, grid_s, grid_zp, stats, given, br, bc, nbr, nbc, register, fmt, spec, config,
            dual_out=None, geometry=None, amax=None):
    """_quantize_kernel over the (P, R, C) view `v` (and, where the schedule defers, its FIXUP launch); `amax`
    (with `given`) receives the input's finite amax."""
    P, R, C = v.shape
    if amax is not None:
        stats = amax  # where SCALE_GIVEN_AMAX maxes it
    tile, num_warps = geometry or tile_geometry(br, bc, R, C, register, config, asym=fmt.ASYM, amax=amax is not None)
    tiles_r, tiles_c = _cdiv(R, tile.RB * tile.TBR), _cdiv(C, tile.CB * tile.TBC)
    codes_b = bytes_of(codes)
    ccols = (C + 1) // 2 if spec.element.bits == 4 else C  # codes are contiguous over (P, R, C)
    sq_r, sq_p = ccols, R * ccols
    dummy = codes_b
    codes_t = scales_t = zp_t = None
    if dual_out is not None:
        codes_t, scales_t, zp_t = dual_out
    tiles = P * tiles_r * tiles_c
    run = schedule(tile, num_warps, register, dual_out is not None, fmt.ASYM, fmt.IS_INT, config)
    programs = min(tiles, persistent_programs(v.device, run.per_sm)) if run.per_sm else tiles
    limits = {} if run.maxnreg is None else dict(maxnreg=run.maxnreg)
    if run.defer:  # the careful tiles' count, then their ids
        stats = scratch(1 + tiles, torch.int32, v.device)
    args = (input_view(v), codes_b, bytes_of(grid_s), dummy if grid_zp is None else bytes_of(grid_zp),
            dummy if stats is None else stats, dummy if given is None else given,
            dummy if codes_t is None else bytes_of(codes_t), dummy if scales_t is None else bytes_of(scales_t),
            dummy if zp_t is None else bytes_of(zp_t),
            R, C, nbr, nbc, br, bc, tiles_r, tiles_c,
            v.stride(0), v.stride(1), v.stride(2), sq_p, sq_r, grid_s.stride(0), grid_s.stride(1),
            0 if scales_t is None else scales_t.stride(0), 0 if scales_t is None else scales_t.stride(1))
    if amax is not None:
        source = SCALE_GIVEN_AMAX
    else:
        source = SCALE_REGISTER if register else (SCALE_STATS if stats is not None else SCALE_GIVEN)
    kwargs = dict(TILE=tile, FMT=fmt, SCALE_SRC=source.value, BID_ROWS=nbr > 1, BID_COLS=nbc > 1,
                  SCALES_EACH=1 if register else pow2_ceil(_cdiv(nbr * nbc, tiles)),
                  DUAL=dual_out is not None, PACK4=spec.element.bits == 4, BF16_BITS=bf16_bits(v),
                  num_warps=run.warps, NUM_TILES=tiles, DUAL_PLAN=dual_plan(spec, config, R, dual_out is not None))
    launch(_quantize_kernel, (programs,), *args, TILE_MODE=tile_mode(run), STAGES=run.stages, **kwargs, **limits)
    if run.defer:  # the listed tiles, coded in place
        launch(_quantize_kernel, (min(tiles, persistent_programs(v.device, config.fixup_programs)),), *args,
               TILE_MODE=(ONE_BLOCK if run.one_block else MANY_BLOCKS).value, FIXUP=True, **kwargs)


def tile_mode(run) -> int:
    """TILE_MODE of _quantize_kernel for a quantize_plan.Schedule."""
    if run.defer:
        return DEFERRED.value
    return (ONE_BLOCK if run.one_block else MANY_BLOCKS).value


def quantize_dual(x: torch.Tensor, spec: QuantSpec, *, scale_layout: str = "row",
                  exact_fp8: bool | None = None, config: KernelConfig = DEFAULT):
    """From one read of X (M, K): (X quantized 1 x g along rows, X^T (K, M) quantized 1 x g along its rows).

    The second is what reference.quantize(x.T.contiguous(), spec) gives: the 128x1 column
    blocks of X that a backward pass needs. spec must be group granularity with a
    power-of-two group size and one byte a code (not mxfp4).
    """
    reference.check_input(x, spec)
    if x.dim() != 2:
        raise ValueError(f"quantize_dual: expected a 2-D tensor, got shape {list(x.shape)}")
    g = spec.group_size
    if spec.granularity != Granularity.GROUP or g & (g - 1) or g > 256:
        raise ValueError("quantize_dual: needs group granularity with a power-of-two group size <= 256, "
                         f"got {spec.describe()}")
    if spec.element.bits != 8:
        raise ValueError(f"quantize_dual: {spec.format.value} packs two codes a byte; the dual layout needs one")
    if x.numel() == 0:
        return (quantize(x, spec, scale_layout=scale_layout, config=config),
                quantize(x.T, spec, scale_layout=scale_layout, config=config))
    fmt = element_constants(spec, exact_fp8, config.guarded_quotient)
    M, K = x.shape
    rows, cols = (_empty(shape, spec, x.device, scale_layout) for shape in ((M, K), (K, M)))
    tile, num_warps = dual_geometry(K, g, config)
    key = ("quantize_dual", x.shape, x.stride(), x.dtype, x.device, spec, scale_layout, exact_fp8, config,
           interpreting())
    planned(key, [x, rows.codes, rows.scales, rows.zero_points, cols.codes, cols.scales, cols.zero_points], x.device,
            lambda: _launch(x.reshape(1, M, K), rows.codes, rows.scales, rows.zero_points, None, None, 1, g, M,
                            _cdiv(K, g), True, fmt, spec, config, dual_out=(cols.codes, cols.scales, cols.zero_points),
                            geometry=(tile, num_warps)))
    return rows, cols


def dual_plan(spec: QuantSpec, config: KernelConfig, rows: int, dual: bool = True) -> DualPlan:
    """The DUAL_PLAN of a dual-layout launch of `spec` over X of `rows` rows (KernelConfig.dual_slabs or
    dual_slabs_mx_asym, dual_prefetch or dual_prefetch_mx, dual_column_lanes or dual_column_lanes_mx, its lanes at
    most the tile's rows, dual_late_check, dual_l2_prefetch where it names spec's format: compiled only, the
    interpreter runs no PTX; dual_row_words: float codes, a multiple of 4 rows, and at least 4 rows a thread of a
    column); of any other launch, DualPlan()."""
    if not dual:
        return DualPlan()
    slabs = config.dual_slabs_mx_asym if spec.is_mx or spec.format == Format.INT8_ASYM else config.dual_slabs
    cols, lanes = (config.dual_column_lanes_mx if spec.is_mx else config.dual_column_lanes) or (0, 0)
    lanes = min(lanes, spec.group_size)  # a tile's rows (dual_geometry)
    words = (config.dual_row_words and cols > 0 and spec.element.kind == "float" and rows % 4 == 0
             and spec.group_size // lanes >= 4)
    prefetch = config.dual_prefetch_mx if spec.is_mx else config.dual_prefetch
    l2 = config.dual_l2_prefetch
    l2 = l2 if isinstance(l2, bool) else spec.format.value in l2
    return DualPlan(slabs, prefetch, cols, lanes, config.dual_late_check, l2 and not interpreting(), words)


def dual_geometry(K: int, g: int, config: KernelConfig) -> tuple[Tile, int]:
    """(Tile, warps) of quantize_dual's programs over K columns in groups of g: g rows, as many groups a row as
    config.tile_elems allows."""
    cb = max(1, min(pow2_ceil(_cdiv(K, g)), max(1, config.tile_elems // (g * g))))
    tile = Tile(g, 1, 1, cb, g, g)
    return tile, warps(tile.elems, config)


def _to_device(qt: QuantizedTensor, device) -> QuantizedTensor:
    return QuantizedTensor.from_stored({name: t.to(device) for name, t in qt.stored().items()}, qt.spec, qt.shape)
