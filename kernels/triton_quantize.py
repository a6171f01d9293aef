"""Triton quantization kernels, bit-exact with kernels/reference.py.

Every granularity is seen through one geometry: the input viewed as (P, R, C) with
strides, blocks of (BR, BC) elements over the (R, C) plane, shared by all P
(P > 1 only for a channel axis in the middle of the tensor). Scales are laid out as
the (NBR, NBC) grid of blocks. Two kernels do all the work:

* `_quantize_kernel` loads a 4-D register tile [RB, BRP, CB, BCP] (RB x CB blocks,
  each padded to powers of two), reduces each block's amax in registers and writes
  codes and scales in one read of X. With DUAL it also writes the transposed, column-wise
  quantized copy, from a second load of the tile that hits L2.
  When a block is too large for registers (per tensor, per channel, huge groups)
  or the scales are given, it reads per-block statistics or scales instead.
* `_block_stats_kernel` computes those statistics for the large blocks with
  atomic max (exact and order independent, hence deterministic).

Under the Triton interpreter the float -> fp8 cast is wrong, so EXACT_FP8 computes
fp8 codes with the reference's integer grid arithmetic; compiled kernels use the
hardware cast (both are checked against the reference on the GPU).

Every code is that of the IEEE quotient x / scale, as in the reference; _quotient says
how each kind of program gets it without an IEEE division per element where it can.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from .dispatch import _with_scale_layout, scale_tensor
from .launch import sm_count
from .spec import E2M1, E4M3, E5M2, Format, Granularity, QuantizedTensor, QuantSpec, ScaleEncoding, _cdiv

# Padded elements a block may have to be reduced in registers; larger ones take two passes.
MAX_REGISTER_BLOCK = 16384
# Elements one program covers (bytes in flight per program) and its warps (None: by size);
# tuned on an H100 by benchmarks/quantize.py.
TILE_ELEMS = 8192
TILE_WARPS = None
# Registers a thread of the quantize programs may use (None: as ptxas chooses); swept by
# benchmarks/quantize.py --sweep.
TILE_MAXNREG = None
# Programs the statistics pass aims at where it can loop (a few waves of the largest GPUs).
STATS_PROGRAMS = 2048
# Persistent quantize programs: where a program's registers wait on a reduction over the whole tile
# (one large block a program: 128 x 128 tiles, channels) or its encoding is long (INT8 asym), each
# program may loop over tiles with the loads of the next PERSISTENT_STAGES - 1 tiles in flight
# (cp.async), OneBlock.per_sm / ASYM_PROGRAMS / DUAL_PROGRAMS an SM (0: one tile a program).
PERSISTENT_STAGES = 3
ASYM_PROGRAMS = 2
DUAL_PROGRAMS = 0
# Warps of a dual-layout program of up to 16384 elements (a 128 x 128 tile), and its register limit
# (two programs an SM): 0.56 x copy against 0.43 at 8 warps without the limit (H100).
DUAL_WARPS, DUAL_MAXNREG = 8, 128


class OneBlock(NamedTuple):
    """How programs of one block a tile run (128 x 128 tiles, channels, long flat blocks)."""
    defer: bool  # no code for careful tiles (Inf/NaN, extreme scales): listed for a second launch (FIXUP)
    per_sm: int  # persistent programs an SM (0: one tile a program)
    tile_elems: int  # elements a thread of a 2-D block
    row_elems: int  # elements a thread of a block of one row
    maxnreg: int | None  # register limit a thread (None: as ptxas chooses)


# Float formats: careful tiles deferred, one tile a program at 8 warps (a 128 x 128 tile) within 128
# registers, two programs an SM. INT8, whose codes take more registers: persistent programs, a row block
# at 16 elements a thread. Measured on an H100 (benchmarks/quantize.py --sweep, BENCHMARKS.md).
ONE_BLOCK_FLOAT = OneBlock(defer=True, per_sm=0, tile_elems=64, row_elems=64, maxnreg=128)
ONE_BLOCK_INT = OneBlock(defer=False, per_sm=1, tile_elems=32, row_elems=16, maxnreg=None)
# Programs an SM of the launch that quantizes the deferred careful tiles.
FIXUP_PROGRAMS = 2
# INT8 asym programs: warps, and the register limit that keeps two of them on an SM without spilling
# (255 registers at 4 warps otherwise: 0.918 against 0.852 x copy, H100, BENCHMARKS.md).
ASYM_WARPS, ASYM_MAXNREG = 8, 128


# ---- element arithmetic (shared by every kernel) -----------------------------------------


@triton.jit
def _exponent(a):
    """floor(log2(a)) of non-negative fp32 `a` from its bits; -127 for zero and subnormals."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(e):
    """2**e as fp32 for int32 e in [-127, 127] (2**-127 is a subnormal)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 1 << tl.maximum(e + 149, 0))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rint(v):
    """Round fp32 |v| <= 2**22 to an integer, ties to even (exact: the sum's rounding does it)."""
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23


@triton.jit
def _rint_int32(v):
    """_rint(v) as int32, read off the bits of the same sum (no float -> int conversion)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _block_scale(amax, nlo, QMAX: tl.constexpr, ASYM: tl.constexpr, POW2: tl.constexpr, MX: tl.constexpr,
                 EMAX: tl.constexpr):
    """(scale, zero point) of a block from its finite amax (or, for ASYM, hi = amax and lo = -nlo)."""
    zp = tl.zeros_like(amax)
    if ASYM:
        span = amax + nlo  # hi - lo with lo = -nlo: exact negation, one rounding as in the reference
        scale = tl.math.div_rn(span, 2 * QMAX + 1)
        scale = tl.where(scale > 0, scale, 1.0)
        zp = -(QMAX + 1) - _rint(tl.math.div_rn(-nlo, scale))
    elif POW2:
        if MX:
            e = _exponent(amax) - EMAX
        else:
            ratio = tl.math.div_rn(amax, QMAX)
            e = _exponent(ratio) + ((ratio.to(tl.int32, bitcast=True) & 0x7FFFFF) != 0).to(tl.int32)
        scale = _pow2(_scale_exponent(e, amax > 0))
    else:
        scale = tl.math.div_rn(amax, QMAX)
        scale = tl.where(scale > 0, scale, 1.0)
    return scale, zp


@triton.jit
def _scale_exponent(e, nonzero):
    """The exponent of a power-of-two scale: e clamped to E8M0's [-127, 127]; 0 for an all-zero block."""
    return tl.where(nonzero, tl.minimum(tl.maximum(e, -127), 127), 0)


@triton.jit
def _stored_scale(scale, POW2: tl.constexpr):
    """What the scale tensor holds: fp32, or the E8M0 byte of floor(log2(scale))."""
    if POW2:
        stored = (tl.minimum(tl.maximum(_exponent(scale), -127), 127) + 127).to(tl.uint8)
    else:
        stored = scale
    return stored


# How x / scale is computed (see _quotient).
DIVIDE = tl.constexpr(0)
RECIPROCAL = tl.constexpr(1)
CORRECTED = tl.constexpr(2)
CORRECTED_ANY_ZERO = tl.constexpr(3)
# Scales within which CORRECTED is exact for every quotient that can change a code (and x finite).
CORRECTED_MIN = tl.constexpr(2.0 ** -80)
CORRECTED_MAX = tl.constexpr(2.0 ** 100)


@triton.jit
def _quotient(x, scale, QUOTIENT: tl.constexpr):
    """x / scale rounded to nearest even fp32 (IEEE division), as the reference divides.

    DIVIDE: IEEE division, element by element.
    RECIPROCAL: scale is 2**e, e in [-127, 127]: 1 / scale is exact and x times it rounds as
    x / scale does (one correctly rounded result of the same real number).
    CORRECTED: q0 = x * r with r = RN(1 / scale) per block, then one correction by the exact
    remainder, q0 + RN(x - q0 * scale) * r (two fmas): the same steps as the GPU's own division,
    with a correctly rounded reciprocal. The caller guarantees finite x, |x / scale| < 2**17 and
    scale in [CORRECTED_MIN, CORRECTED_MAX]: there the remainder is exact wherever
    |x / scale| >= 2**-20, and the result is the IEEE quotient in every case searched (NUMERICS.md);
    smaller quotients may differ in the last bits, and every format's code of them is zero.
    """
    if QUOTIENT == RECIPROCAL:
        q = x * tl.math.div_rn(1.0, scale)
    elif QUOTIENT == CORRECTED or QUOTIENT == CORRECTED_ANY_ZERO:
        r = tl.math.div_rn(1.0, scale)
        q0 = x * r
        q = tl.fma(tl.fma(q0, -scale, x), r, q0)  # -scale: the block's, exact (Triton's -q0 is 0 - q0, an extra op)
        if QUOTIENT == CORRECTED:
            q = tl.where(x == 0.0, x, q)  # x = -0 keeps its sign (CORRECTED_ANY_ZERO: for int8, which has one zero)
    else:
        q = tl.math.div_rn(x, scale)
    return q


@triton.jit
def _encode(x, scale, zp, QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr,
            NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
            NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr, QUOTIENT: tl.constexpr):
    """Code bits (int32; two's complement for int8) of fp32 `x` under `scale` (and `zp`).

    QUOTIENT: how x / scale is computed (see _quotient).
    """
    return _encode_quotient(x, _quotient(x, scale, QUOTIENT), zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS,
                            NAN_CODE, HW_FP8, EXACT_FP8)


@triton.jit
def _encode_quotient(x, q, zp, QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr,
                     NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
                     NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr,
                     FINITE: tl.constexpr = False):
    """Code bits of the quotients q = x / scale (see _encode).

    FINITE (int8 asym): no x is +-Inf and q = x / scale of the block's own scale, so |q| <= 2 * 128
    or q is NaN (x NaN): no clamp before rounding, and only NaN x needs a select."""
    if ASYM and FINITE:
        zpi = zp.to(tl.int32)
        bits = tl.where(x != x, zpi, tl.minimum(tl.maximum(_rint_int32(q) + zpi, -128), 127))
    elif IS_INT:
        # int8 is the one integer format.
        if ASYM:
            zpi = zp.to(tl.int32)
            c = _rint_int32(tl.minimum(tl.maximum(q, -2.0 * (QMAX + 1)), 2.0 * (QMAX + 1))) + zpi
            c = tl.minimum(tl.maximum(c, -128), 127)
            bits = tl.where(x != x, zpi, tl.where(q != q, 0, c))
        else:
            bits = tl.where(q != q, 0, _rint_int32(tl.minimum(tl.maximum(q, -QMAX), QMAX)))
        # A NaN quotient of a non-NaN x (Inf / Inf when span overflowed) is stored as torch
        # stores NaN in int8: 0. (min/max may drop NaN, so this is tested on q.)
    else:
        bits = _encode_float(q, QMAX, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8)
    return bits


@triton.jit
def _e2m1(q):
    """E2M1 code bits of fp32 quotients q: round to nearest even, +-Inf and overflow saturate to
    +-6, NaN -> 0 (E2M1 has no NaN; the reference's NAN_CODE). |q| >= 1 rounds the fp32 bits to
    one mantissa bit (a carry moves into the exponent) and re-biases; |q| < 1 lies on the grid
    of 0.5, rounded by an fp32 addition."""
    a = tl.minimum(tl.abs(q), 6.0)
    b = a.to(tl.int32, bitcast=True)
    normal = ((b + 0x1FFFFF + ((b >> 22) & 1)) >> 22) - 252
    sub = (a * 2.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    bits = tl.where(a < 1.0, sub, normal) | ((q.to(tl.int32, bitcast=True) >> 28) & 8)
    return tl.where(q != q, 0, bits)


@triton.jit
def _encode_float(q, QMAX: tl.constexpr, NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  BIAS: tl.constexpr, NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr):
    """Minifloat code bits of quotients `q`: clamp, round to nearest even, NaN -> NAN_CODE."""
    if NBITS == 4:
        bits = _e2m1(q)
    elif HW_FP8 != 0 and not EXACT_FP8:
        # The hardware conversion (cvt.rn.satfinite) is the reference's encoding: it rounds to
        # nearest even, saturates +-Inf and overflow to +-max, and writes 0x7F (NAN_CODE) for NaN.
        if HW_FP8 == 1:
            bits = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        else:
            bits = q.to(tl.float8e5).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        # The reference's round_to_grid + encode_minifloat_bits, exactly, in integer arithmetic:
        # normal results round the fp32 bits to MBITS mantissa bits (ties to even; a carry
        # moves into the exponent) and re-bias; subnormal ones let an fp32 addition round
        # onto the 2**(EMIN - MBITS) grid and read the multiple off the sum's bits.
        qc = tl.minimum(tl.maximum(q, -QMAX), QMAX)  # +-Inf saturates; NaN is replaced below
        ab = tl.abs(qc).to(tl.int32, bitcast=True)
        normal = ((ab + ((1 << (22 - MBITS)) - 1) + ((ab >> (23 - MBITS)) & 1)) >> (23 - MBITS)) \
            - ((127 - BIAS) << MBITS)
        magic = tl.zeros_like(ab) + ((EMIN - MBITS + 23 + 127) << 23)  # 2**(EMIN - MBITS + 23)
        sub = (tl.abs(qc) + magic.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - magic
        bits = tl.where(ab < ((EMIN + 127) << 23), sub, normal)
        bits = bits | (((qc.to(tl.int32, bitcast=True) >> 31) & 1) << (NBITS - 1))
        bits = tl.where(q != q, NAN_CODE, bits)
    return bits


@triton.jit
def _tile_coords(pid, R, C, TILES_R, TILES_C, RB: tl.constexpr, TBR: tl.constexpr, TBRP: tl.constexpr,
                 CB: tl.constexpr, TBC: tl.constexpr, TBCP: tl.constexpr):
    """Tile `pid`: RB x CB sub-tiles (TBR x TBC, padded to TBRP x TBCP) over the (P, R, C) view.

    Returns (p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid): the 4-D [RB, TBRP, CB, TBCP] index
    pieces, the element rows and columns, and the mask of real elements.
    """
    pid_c = pid % TILES_C
    pid_r = (pid // TILES_C) % TILES_R
    p = pid // (TILES_C * TILES_R)
    rb = tl.arange(0, RB)[:, None, None, None]
    i = tl.arange(0, TBRP)[None, :, None, None]
    cb = tl.arange(0, CB)[None, None, :, None]
    j = tl.arange(0, TBCP)[None, None, None, :]
    rows = (pid_r * RB + rb) * TBR + i
    cols = (pid_c * CB + cb) * TBC + j
    valid = (rows < R) & (cols < C)
    if TBR != TBRP:
        valid = valid & (i < TBR)
    if TBC != TBCP:
        valid = valid & (j < TBC)
    return p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid


@triton.jit
def _block_ids(rows, cols, BR, BC, NBR, NBC, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr):
    """Block row and column of each element, for blocks of BR x BC, on the axes where the block
    varies (else 0), clamped into the NBR x NBC grid so that padding lanes name a real block."""
    brow = tl.zeros([1, 1, 1, 1], tl.int32)
    bcol = tl.zeros([1, 1, 1, 1], tl.int32)
    if BID_ROWS:
        brow = tl.minimum(rows // BR, NBR - 1)
    if BID_COLS:
        bcol = tl.minimum(cols // BC, NBC - 1)
    return brow, bcol


@triton.jit
def _load_fp32(ptrs, mask, BF16_BITS: tl.constexpr):
    """Load as fp32. BF16_BITS: the input is bf16 viewed as int16, widened on the bits
    (the interpreter's bf16 -> fp32 cast loses subnormals)."""
    if BF16_BITS:
        x = (tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _finite_abs(x):
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def _blocks_max(v):
    """Max of v over each block of a [RB, TBRP, CB, TBCP] tile (axes 1 and 3). NaN is ignored, as max
    ignores it."""
    return tl.max(tl.max(v, axis=3, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _register_scales(x, QMAX: tl.constexpr, ASYM: tl.constexpr, POW2: tl.constexpr,
                     MX: tl.constexpr, EMAX: tl.constexpr, DEFER: tl.constexpr = False):
    """(scale, zero point, careful) of the blocks of a register tile (see _blocks_max).

    The amax (ASYM: hi and -lo) is first reduced over all elements, one max an element. careful
    (a scalar) is 1 where that met an Inf or NaN, or some scale of the tile is outside
    [CORRECTED_MIN, CORRECTED_MAX]: then the amax is reduced again over the finite elements only,
    as the reference does, and the codes are divided exactly. DEFER: a careful tile is left to another
    launch (ONE_BLOCK 2 of _quantize_tile), so its scales are not reduced again here.
    """
    if ASYM:
        hi = _blocks_max(x)
        nlo = _blocks_max(-x)
    else:
        hi = _blocks_max(tl.abs(x))
        nlo = 0.0
    scale, zp = _block_scale(tl.maximum(hi, 0.0), tl.maximum(nlo, 0.0), QMAX, ASYM, POW2, MX, EMAX)
    wild = (scale < CORRECTED_MIN) | (scale > CORRECTED_MAX) | ~(hi < float("inf"))  # NaN: a max may keep it
    if ASYM:
        wild = wild | ~(nlo < float("inf"))
    careful = tl.max(wild.to(tl.int32))
    if careful != 0 and not DEFER:
        if ASYM:
            hi = _blocks_max(tl.where(x < float("inf"), x, 0.0))
            nlo = _blocks_max(tl.where(-x < float("inf"), -x, 0.0))
        else:
            hi = _blocks_max(_finite_abs(x))
        scale, zp = _block_scale(tl.maximum(hi, 0.0), tl.maximum(nlo, 0.0), QMAX, ASYM, POW2, MX, EMAX)
    return scale, zp, careful


@triton.jit
def _encode_careless(x, scale, zp, QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr,
                     NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
                     NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr):
    """Codes of a tile that is not careful (see _register_scales): the corrected quotient (int8, with
    one zero, need not keep the sign of -0); INT8 asym without the clamp before rounding (no x is
    +-Inf there; NaN may be)."""
    if IS_INT:
        bits = _encode_quotient(x, _quotient(x, scale, CORRECTED_ANY_ZERO), zp, QMAX, IS_INT, ASYM, NBITS, MBITS,
                                EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8, ASYM)
    else:
        bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                       CORRECTED)
    return bits


@triton.jit
def _encode_register(x, scale, zp, careful, QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr,
                     NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
                     NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr, POW2: tl.constexpr):
    """_encode with the scales of _register_scales of a tile of many blocks: a power-of-two scale by
    its reciprocal, any other by the corrected quotient unless the tile is careful. Only the fp32
    quotient is chosen under the branch and encoded after it (int8 sym too: without the select that
    keeps -0 ptxas gave it 167 registers a thread instead of 127, and it ran slower on an H100,
    BENCHMARKS.md), except for INT8 asym, whose codes are encoded under it (_encode_careless). Programs of
    one block branch around the store too (_quantize_tile)."""
    if POW2:
        bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                       RECIPROCAL)
    elif ASYM:
        if careful == 0:
            bits = _encode_careless(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8,
                                    EXACT_FP8)
        else:
            bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                           DIVIDE)
    else:
        if careful == 0:
            q = _quotient(x, scale, CORRECTED)
        else:
            q = _quotient(x, scale, DIVIDE)
        bits = _encode_quotient(x, q, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8)
    return bits


# ---- kernels ------------------------------------------------------------------------------


@triton.jit
def _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, RB: tl.constexpr,
                 TBRP: tl.constexpr, CB: tl.constexpr, TBC: tl.constexpr, TBCP: tl.constexpr, PACK4: tl.constexpr):
    """Store a tile's code bits, contiguous over (P, R, C) (PACK4: two nibbles a byte along C)."""
    q_base = codes_ptr + p.to(tl.int64) * sq_p + rows.to(tl.int64) * sq_r
    if PACK4:
        # Element 2i in the low nibble: shift odd elements up and add the pairs (disjoint bits).
        nib = tl.reshape(bits & 0xF, [RB, TBRP, CB, TBCP // 2, 2]) << (4 * tl.arange(0, 2))[None, None, None, None, :]
        packed = tl.sum(nib, axis=4)
        jb = tl.arange(0, TBCP // 2)[None, None, None, :]
        bcols = (pid_c * CB + cb) * (TBC // 2) + jb
        bmask = (rows < R) & (bcols < sq_r)  # sq_r = ceil(C / 2) code bytes a row
        tl.store(q_base + bcols, packed.to(tl.uint8), mask=bmask)
    else:
        tl.store(q_base + cols, bits.to(tl.uint8), mask=valid)


@triton.jit
def _quantize_tile(
    pid,
    x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr,
    R, C, NBR, NBC, BR, BC, TILES_R, TILES_C,
    sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r, sst_c,
    RB: tl.constexpr, TBR: tl.constexpr, TBRP: tl.constexpr, CB: tl.constexpr, TBC: tl.constexpr, TBCP: tl.constexpr,
    SCALE_SRC: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr, DUAL: tl.constexpr, PACK4: tl.constexpr,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr, POW2: tl.constexpr, MX: tl.constexpr,
    EMAX: tl.constexpr, NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
    NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr, BF16_BITS: tl.constexpr,
    ONE_BLOCK: tl.constexpr = 0,
):
    """Codes (and scales) of one [RB, TBRP, CB, TBCP] tile.

    The tile holds RB x CB sub-tiles of TBR x TBC elements (padded to TBRP x TBCP).
    SCALE_SRC 0: sub-tiles are the blocks; their scales are reduced here.
    SCALE_SRC 1: scales come from per-block stats (amax, or hi and -lo) in stats_ptr.
    SCALE_SRC 2: scales are given (fp32) in given_ptr.
    (1 and 2 look blocks up by row and/or column ids: BID_ROWS / BID_COLS.)
    Codes are written contiguously over (P, R, C) (PACK4: two nibbles a byte along C).
    DUAL (1 x TBC row groups, RB = TBC rows a program): each column of the tile is also a
    block of X^T, quantized into codes_t (C, R), scales_t and zp_t.
    ONE_BLOCK: the tile is one block (SCALE_SRC 0, RB = CB = 1); 2: the same, careful tiles deferred.
    """
    p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid = _tile_coords(
        pid, R, C, TILES_R, TILES_C, RB, TBR, TBRP, CB, TBC, TBCP)
    x_base = x_ptr + p.to(tl.int64) * sx_p
    x = _load_fp32(x_base + rows.to(tl.int64) * sx_r + cols.to(tl.int64) * sx_c, valid, BF16_BITS)

    if SCALE_SRC == 0:
        brow = pid_r * RB + rb  # [RB, 1, 1, 1]
        bcol = pid_c * CB + cb  # [1, 1, CB, 1]
        scale, zp, careful = _register_scales(x, QMAX, ASYM, POW2, MX, EMAX, ONE_BLOCK == 2)
        smask = (brow < NBR) & (bcol < NBC)
        soff = brow.to(tl.int64) * ss_r + bcol.to(tl.int64) * ss_c
        tl.store(scales_ptr + soff, _stored_scale(scale, POW2), mask=smask)
        if ASYM:
            tl.store(zp_ptr + soff, zp.to(tl.int32).to(tl.uint8), mask=smask)
    else:
        # Blocks larger than a sub-tile: look the blocks up, on 1-D row and column ids where the
        # block varies (BID_ROWS / BID_COLS), clamped so that padding lanes read a real block.
        brow, bcol = _block_ids(rows, cols, BR, BC, NBR, NBC, BID_ROWS, BID_COLS)
        bid = brow * NBC + bcol
        if SCALE_SRC == 1:
            if ASYM:
                scale, zp = _block_scale(tl.load(stats_ptr + bid), tl.load(stats_ptr + NBR * NBC + bid),
                                         QMAX, ASYM, POW2, MX, EMAX)
            else:
                scale, zp = _block_scale(tl.load(stats_ptr + bid), 0.0, QMAX, ASYM, POW2, MX, EMAX)
        else:
            scale = tl.load(given_ptr + bid)
            zp = 0.0
        # Each block's scale is written once, by the program holding its first element.
        if p == 0:
            origin = valid & (rows % BR == 0) & (cols % BC == 0)
            soff = (rows // BR).to(tl.int64) * ss_r + (cols // BC).to(tl.int64) * ss_c
            tl.store(scales_ptr + soff, _stored_scale(scale, POW2), mask=origin)
            if ASYM:
                tl.store(zp_ptr + soff, zp.to(tl.int32).to(tl.uint8), mask=origin)

    if SCALE_SRC == 0 and ONE_BLOCK == 2:
        # Careful tiles are left to a second launch (FIXUP of _quantize_kernel) over the list in
        # stats_ptr (their count, then their ids), so that these programs need no registers for them.
        if careful == 0:
            if POW2:
                bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8,
                               EXACT_FP8, RECIPROCAL)
            else:
                bits = _encode_careless(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8,
                                        EXACT_FP8)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, RB, TBRP, CB, TBC, TBCP, PACK4)
        else:
            slot = tl.atomic_add(stats_ptr, 1)
            tl.store(stats_ptr + 1 + slot, pid)
    elif SCALE_SRC == 0 and ONE_BLOCK and not POW2:
        # One block a program: the codes are encoded and stored under the branch (faster on an H100
        # than a store after it, and the form that matched the reference there: BENCHMARKS.md).
        if careful == 0:
            bits = _encode_careless(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8,
                                    EXACT_FP8)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, RB, TBRP, CB, TBC, TBCP, PACK4)
        else:
            bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                           DIVIDE)
            _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, RB, TBRP, CB, TBC, TBCP, PACK4)
    else:
        if SCALE_SRC == 0:
            bits = _encode_register(x, scale, zp, careful, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE,
                                    HW_FP8, EXACT_FP8, POW2)
        elif POW2 and SCALE_SRC == 1:  # given scales need not be powers of two even when stored as E8M0
            bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                           RECIPROCAL)
        else:
            bits = _encode(x, scale, zp, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                           DIVIDE)
        _store_codes(bits, codes_ptr, p, rows, cols, valid, pid_c, cb, R, sq_p, sq_r, RB, TBRP, CB, TBC, TBCP, PACK4)

    if DUAL:
        # The column-wise copy from a second load of the tile (an L2 hit), laid out as X^T's rows:
        # [CB * TBCP, 1, 1, RB], each row (a column of X) one group, so that it is reduced and
        # encoded like the row-wise copy and stored along X^T's rows (faster on an H100 and an H200 than
        # reducing the first load's registers along the columns and transposing the codes, BENCHMARKS.md).
        rows_t = pid_r * RB + tl.arange(0, RB)[None, None, None, :]
        cols_t = pid_c * CB * TBC + tl.arange(0, CB * TBCP)[:, None, None, None]
        valid_t = (rows_t < R) & (cols_t < C)
        xt = _load_fp32(x_base + rows_t.to(tl.int64) * sx_r + cols_t.to(tl.int64) * sx_c, valid_t, BF16_BITS)
        scale_t, zp_t, careful_t = _register_scales(xt, QMAX, ASYM, POW2, MX, EMAX)
        st_off = cols_t.to(tl.int64) * sst_r + pid_r * sst_c
        tl.store(scales_t_ptr + st_off, _stored_scale(scale_t, POW2), mask=cols_t < C)
        if ASYM:
            tl.store(zp_t_ptr + st_off, zp_t.to(tl.int32).to(tl.uint8), mask=cols_t < C)
        bits_t = _encode_register(xt, scale_t, zp_t, careful_t, QMAX, IS_INT, ASYM, NBITS, MBITS, EMIN, BIAS, NAN_CODE,
                                  HW_FP8, EXACT_FP8, POW2)
        tl.store(codes_t_ptr + cols_t.to(tl.int64) * R + rows_t, bits_t.to(tl.uint8), mask=valid_t)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr, zp_t_ptr,
    R, C, NBR, NBC, BR, BC, TILES_R, TILES_C,
    sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c, sst_r, sst_c,
    RB: tl.constexpr, TBR: tl.constexpr, TBRP: tl.constexpr, CB: tl.constexpr, TBC: tl.constexpr, TBCP: tl.constexpr,
    SCALE_SRC: tl.constexpr, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr, DUAL: tl.constexpr, PACK4: tl.constexpr,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, ASYM: tl.constexpr, POW2: tl.constexpr, MX: tl.constexpr,
    EMAX: tl.constexpr, NBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
    NAN_CODE: tl.constexpr, HW_FP8: tl.constexpr, EXACT_FP8: tl.constexpr, BF16_BITS: tl.constexpr,
    ONE_BLOCK: tl.constexpr = 0, NUM_TILES=1, STAGES: tl.constexpr = 0, FIXUP: tl.constexpr = False,
):
    """_quantize_tile of tile program_id(0) (STAGES 0), or of tiles pid, pid + programs, ... < NUM_TILES
    with the loads of the next STAGES - 1 tiles in flight (persistent programs). FIXUP: of the tiles
    listed in stats_ptr by a launch with ONE_BLOCK 2, each program taking every programs-th."""
    if FIXUP:
        for i in range(tl.program_id(0), tl.load(stats_ptr), tl.num_programs(0)):
            _quantize_tile(tl.load(stats_ptr + 1 + i), x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr,
                           codes_t_ptr, scales_t_ptr, zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r,
                           sx_c, sq_p, sq_r, ss_r, ss_c, sst_r, sst_c, RB, TBR, TBRP, CB, TBC, TBCP, SCALE_SRC, BID_ROWS,
                           BID_COLS, DUAL, PACK4, QMAX, IS_INT, ASYM, POW2, MX, EMAX, NBITS, MBITS, EMIN, BIAS, NAN_CODE,
                           HW_FP8, EXACT_FP8, BF16_BITS, ONE_BLOCK)
    elif STAGES == 0:
        _quantize_tile(tl.program_id(0), x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr,
                       scales_t_ptr, zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r,
                       ss_r, ss_c, sst_r, sst_c, RB, TBR, TBRP, CB, TBC, TBCP, SCALE_SRC, BID_ROWS, BID_COLS, DUAL,
                       PACK4, QMAX, IS_INT, ASYM, POW2, MX, EMAX, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                       BF16_BITS, ONE_BLOCK)
    else:
        for tile in tl.range(tl.program_id(0), NUM_TILES, tl.num_programs(0), num_stages=STAGES):
            _quantize_tile(tile, x_ptr, codes_ptr, scales_ptr, zp_ptr, stats_ptr, given_ptr, codes_t_ptr, scales_t_ptr,
                           zp_t_ptr, R, C, NBR, NBC, BR, BC, TILES_R, TILES_C, sx_p, sx_r, sx_c, sq_p, sq_r, ss_r, ss_c,
                           sst_r, sst_c, RB, TBR, TBRP, CB, TBC, TBCP, SCALE_SRC, BID_ROWS, BID_COLS, DUAL, PACK4, QMAX,
                           IS_INT, ASYM, POW2, MX, EMAX, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8,
                           BF16_BITS, ONE_BLOCK)


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
        x = _load_fp32(x_ptr + p.to(tl.int64) * sx_p + rows.to(tl.int64) * sx_r + cols.to(tl.int64) * sx_c,
                       (rows < R) & (cols < C), BF16_BITS)
        if ASYM:
            hi = tl.maximum(hi, tl.where(x < float("inf"), x, 0.0))
            nlo = tl.maximum(nlo, tl.where(-x < float("inf"), -x, 0.0))
        else:
            hi = tl.maximum(hi, _finite_abs(x))
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


@triton.jit
def _e2m1_bf16_pairs(w, e):
    """E2M1 code byte of each int32 word of two bf16 elements (element 2i in the low nibble) under the
    scale 2**e (e in [-127, 127]), in packed bf16x2 arithmetic (sm_90 PTX; no NaN among the elements).

    Per element: q = x * 2**-e, exact but where it falls below bf16's normals (such q code as 0);
    a = min(|q|, 6);
    M = 2**(6 + max(floor(log2(a)), 0)), the bf16 whose ulp is the E2M1 step in a's binade (0.5, 1
    or 2); s = RN(a + M) puts a on the E2M1 grid, ties to even; the code is the number of steps s
    lies above M (its low 7 bits) plus twice M's exponent above 2**6 (bits 7-8 of s hold that
    exponent above 2**5). Every lane stays within its 16 bits, so the integer steps act on both
    elements at once. The same arithmetic in torch matched the reference's codes of every bf16
    value under every scale 2**-127 .. 2**127.
    """
    r = tl.where(e < 127, (127 - e) << 7, 0x40)  # bf16 bits of 2**-e (2**-127 is a subnormal)
    r2 = tl.broadcast_to(r | (r << 16), w.shape)
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 q, a, m, s, t, six, one;
        mov.b32 six, 0x40C040C0;
        mov.b32 one, 0x3F803F80;
        mul.rn.bf16x2 q, $1, $2;
        and.b32 a, q, 0x7FFF7FFF;
        min.u16x2 a, a, six;
        and.b32 m, a, 0x7F807F80;
        max.u16x2 m, m, one;
        add.u32 m, m, 0x03000300;
        add.rn.bf16x2 s, a, m;
        shr.u32 t, s, 6;
        and.b32 t, t, 0x00060006;
        and.b32 s, s, 0x007F007F;
        add.u32 s, s, t;
        sub.u32 s, s, 0x00020002;
        shr.u32 t, $1, 12;
        and.b32 t, t, 0x00080008;
        or.b32 s, s, t;
        shr.u32 t, s, 12;
        or.b32 s, s, t;
        and.b32 $0, s, 0xFF;
        }
        """,
        constraints="=r,r,r", args=[w, r2], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _max_u16x2(a, b):
    """Maximum of each 16-bit half of int32 words (sm_90 PTX)."""
    return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mxfp4_pairs_kernel(w_ptr, codes_ptr, scales_ptr, R, C2, sw_r, ss_r, ss_c,
                        ROWS: tl.constexpr, GROUPS: tl.constexpr, FP16: tl.constexpr, EMAX: tl.constexpr,
                        PACKED: tl.constexpr):
    """MXFP4 codes of a 16-bit (R, 2 * C2) matrix read as int32 pairs of elements: each word's two
    codes make one byte (element 2i in the low nibble) without reshaping registers.

    A program takes ROWS rows x GROUPS MX blocks of 16 words each. The amax is reduced on the
    magnitude bits (16-bit floats order as their bits do). PACKED (bf16, compiled): tiles without
    Inf or NaN are encoded two elements at a time (_e2m1_bf16_pairs); other tiles, fp16 and the
    interpreter go through fp32 and _e2m1.
    """
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C2, GROUPS * 16)
    pr = pid // tiles_c
    pc = pid % tiles_c
    r = pr * ROWS + tl.arange(0, ROWS)[:, None, None]
    g = pc * GROUPS + tl.arange(0, GROUPS)[None, :, None]
    k = g * 16 + tl.arange(0, 16)[None, None, :]
    mask = (r < R) & (k < C2)
    w = tl.load(w_ptr + r.to(tl.int64) * sw_r + k, mask=mask, other=0)
    if PACKED:  # both halves at once (max.u16x2), then the larger half
        mag = tl.reduce(w & 0x7FFF7FFF, 2, _max_u16x2, keep_dims=True)
        mag = tl.maximum(mag & 0xFFFF, mag >> 16)
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
            # The scale's exponent from the amax's bits, as _block_scale finds it from the amax.
            e = _scale_exponent((mag >> 7) - 127 - EMAX, mag > 0)
            tl.store(s_ptrs, (e + 127).to(tl.uint8), mask=s_mask)
            tl.store(c_ptrs, _e2m1_bf16_pairs(w, e).to(tl.uint8), mask=mask)
        else:
            _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16, EMAX)
    else:
        _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16, EMAX)


@triton.jit
def _mxfp4_pairs_fp32(w, amax, careful, s_ptrs, s_mask, c_ptrs, mask, FP16: tl.constexpr, EMAX: tl.constexpr):
    """Scales and codes of a tile of _mxfp4_pairs_kernel through fp32 and _e2m1: the elements of each
    word as fp32 (lo, hi); a careful tile takes the amax of its finite elements."""
    if FP16:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    if careful != 0:
        amax = tl.maximum(tl.max(_finite_abs(lo), axis=2, keep_dims=True),
                          tl.max(_finite_abs(hi), axis=2, keep_dims=True))
    scale, zp = _block_scale(amax, 0.0, 6.0, False, True, True, EMAX)
    tl.store(s_ptrs, _stored_scale(scale, True), mask=s_mask)
    packed = (_e2m1(_quotient(lo, scale, RECIPROCAL)) & 0xF) | ((_e2m1(_quotient(hi, scale, RECIPROCAL)) & 0xF) << 4)
    tl.store(c_ptrs, packed.to(tl.uint8), mask=mask)


# ---- host side ----------------------------------------------------------------------------


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_geometry(shape, spec: QuantSpec):
    """((P, R, C), (BR, BC)): how a tensor of `shape` is seen by the kernels.

    The tensor is viewed as (P, R, C); blocks are BR x BC over the (R, C) plane and
    shared by all P; scales are the (ceil(R/BR), ceil(C/BC)) grid of blocks.
    """
    g = spec.granularity
    shape = tuple(shape)
    n = math.prod(shape)
    k = shape[-1] if shape else 1
    if g == Granularity.CHANNEL:
        a = spec.axis % len(shape)
        pre, ch, post = math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:])
        if post == 1:  # last axis: one block per column of the (rows, C) matrix
            return (1, pre, ch), (max(pre, 1), 1)
        return (pre, ch, post), (1, post)
    if g == Granularity.FLAT:
        return (1, 1, n), (1, spec.block_size)
    rows = n // k if k else math.prod(shape[:-1])
    if g == Granularity.GROUP:
        return (1, rows, k), (1, spec.group_size)
    if g == Granularity.TILE:
        return (1, rows, k), spec.tile
    return (1, rows, k), (max(rows, 1), max(k, 1))  # tensor: one block


def block_view(x: torch.Tensor, spec: QuantSpec):
    """`x` as its (P, R, C) tensor (a view when torch can express one, else a copy) and (BR, BC)."""
    dims, block = block_geometry(x.shape, spec)
    return x.reshape(dims), block


def element_constants(spec: QuantSpec, exact_fp8: bool | None = None) -> dict:
    """The kernels' format constexprs, read off spec.element."""
    el = spec.element
    hw = {E4M3.code_dtype: 1, E5M2.code_dtype: 2}.get(el.code_dtype, 0) if el.kind == "float" and el is not E2M1 else 0
    return dict(
        QMAX=float(el.max), IS_INT=el.kind == "int", ASYM=spec.format == Format.INT8_ASYM,
        POW2=spec.scale_encoding == ScaleEncoding.POW2, MX=spec.is_mx, EMAX=el.emax if el.kind == "float" else 0,
        NBITS=el.bits, MBITS=el.mbits, EMIN=el.emin, BIAS=el.bias, NAN_CODE=el.nan_code if el.has_nan else 0,
        HW_FP8=hw, EXACT_FP8=interpreting() if exact_fp8 is None else bool(exact_fp8),
    )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _as_grid(t: torch.Tensor, nbr: int, nbc: int) -> torch.Tensor:
    """A scale tensor as its (NBR, NBC) block grid (a view for both layouts)."""
    return t.reshape(nbr, nbc) if t.dim() != 2 else t


def _tile_geometry(br: int, bc: int, rows: int, cols: int, register: bool, tile_elems: int | None = None):
    """(RB, TBR, TBRP, CB, TBC, TBCP, num_warps) of a quantize/dequantize tile.

    register: the tile is made of whole BR x BC blocks; else of 1 x TBC strips. tile_elems: the elements
    a tile aims at (default TILE_ELEMS).
    """
    tile_elems = tile_elems or TILE_ELEMS
    if register:  # whole blocks in registers
        tbr, tbc = br, bc
        tbrp, tbcp = _pow2_ceil(br), _pow2_ceil(bc)
    else:  # any tile; blocks are looked up
        tbr, tbc = 1, min(_pow2_ceil(cols), 1024)
        tbrp, tbcp = 1, tbc
    per_block = tbrp * tbcp
    cb = max(1, min(_pow2_ceil(_cdiv(cols, tbc)), tile_elems // per_block))
    rb = max(1, min(_pow2_ceil(_cdiv(rows, tbr)), tile_elems // (per_block * cb)))
    elems = rb * tbrp * cb * tbcp
    return rb, tbr, tbrp, cb, tbc, tbcp, _warps(elems // 2 if register and tbrp == 1 else elems)


def _warps(elems: int) -> int:
    """Warps of a program over `elems` elements: 32 elements a thread, or 64 for row groups
    (their amax stays within a warp), as measured on an H100 (benchmarks/quantize.py --sweep)."""
    return TILE_WARPS or max(4, min(16, elems // 1024))


def _bf16_bits(x: torch.Tensor) -> bool:
    return interpreting() and x.dtype == torch.bfloat16


def _input_view(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if _bf16_bits(x) else x


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """One-byte tensors (fp8, E8M0, int8) as uint8 views; the kernels write raw bits."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def flat_scales(scales: torch.Tensor) -> torch.Tensor:
    """Explicit scales (checked by reference.check_input) as a flat contiguous fp32 tensor."""
    return scales.float().reshape(-1).contiguous()


def quantize(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None, *,
             scale_layout: str = "row", exact_fp8: bool | None = None) -> QuantizedTensor:
    """Quantize `x` (bf16/fp16/fp32, CUDA or, interpreted, CPU) with `spec`; reference semantics.

    scales: explicit fp32 scales of shape spec.scale_shape (static quantization).
    scale_layout: "row" (row-major) or "col" (the last scale dim slowest).
    exact_fp8: force (True) or forbid (False) integer fp8 encoding; default: only when interpreted.
    """
    reference.check_input(x, spec, scales)
    given = None if scales is None else flat_scales(scales)
    if x.numel() == 0:
        qt = reference.quantize(x.cpu(), spec, None if scales is None else scales.cpu())
        return _with_scale_layout(_to_device(qt, x.device), scale_layout)
    consts = element_constants(spec, exact_fp8)
    v, (br, bc) = block_view(x, spec)
    P, R, C = v.shape
    nbr, nbc = _cdiv(R, br), _cdiv(C, bc)
    sshape = spec.scale_shape(x.shape)
    codes = torch.empty(spec.code_shape(x.shape), dtype=spec.code_dtype, device=x.device)
    stored = scale_tensor(sshape, spec.scale_dtype, x.device, scale_layout)
    zps = scale_tensor(sshape, torch.int8, x.device, scale_layout) if consts["ASYM"] else None
    if given is None and _mxfp4_pairs(v, codes, stored, spec):
        return QuantizedTensor(codes, stored, spec, tuple(x.shape), zps)
    register = given is None and P == 1 and _pow2_ceil(br) * _pow2_ceil(bc) <= MAX_REGISTER_BLOCK
    stats = None
    if given is None and not register:
        stats = _block_stats(v, br, bc, nbr, nbc, consts["ASYM"])
    grid_s = _as_grid(stored, nbr, nbc)
    _launch_quantize(v, codes, grid_s, None if zps is None else _as_grid(zps, nbr, nbc), stats, given,
                     br, bc, nbr, nbc, register, consts, spec)
    return QuantizedTensor(codes, stored, spec, tuple(x.shape), zps)


# Rows and MX blocks a program of the MXFP4 pairs kernel takes (8192 elements, 4 warps).
PAIRS_ROWS, PAIRS_GROUPS, PAIRS_WARPS = 16, 16, 4


def _mxfp4_pairs(v, codes, stored, spec) -> bool:
    """Quantize with _mxfp4_pairs_kernel when `v` (1, R, C) is an MXFP4 input it can read as int32
    pairs (16-bit, unit column stride, even C, row stride and base); False otherwise."""
    P, R, C = v.shape
    if not (spec.element is E2M1 and P == 1 and v.element_size() == 2 and v.stride(2) == 1 and C % 2 == 0
            and v.stride(1) % 2 == 0 and v.data_ptr() % 4 == 0 and R > 0):
        return False
    pairs = v.reshape(R, C).view(torch.int32) if v.stride(1) == C else torch.as_strided(
        v.view(torch.int16), (R, C), (v.stride(1), 1)).view(torch.int32)
    grid_s = _as_grid(stored, R, _cdiv(C, spec.group_size))
    c2 = C // 2
    grid = (_cdiv(R, PAIRS_ROWS) * _cdiv(c2, PAIRS_GROUPS * 16),)
    _mxfp4_pairs_kernel[grid](pairs, _bytes_of(codes), _bytes_of(grid_s), R, c2, pairs.stride(0),
                              grid_s.stride(0), grid_s.stride(1), ROWS=PAIRS_ROWS, GROUPS=PAIRS_GROUPS,
                              FP16=v.dtype == torch.float16, EMAX=spec.element.emax,
                              PACKED=v.dtype == torch.bfloat16 and not interpreting(), num_warps=PAIRS_WARPS)
    return True


def _launch_quantize(v, codes, grid_s, grid_zp, stats, given, br, bc, nbr, nbc, register, consts, spec,
                     dual_out=None, geometry=None):
    P, R, C = v.shape
    rb, tbr, tbrp, cb, tbc, tbcp, warps = geometry or _tile_geometry(br, bc, R, C, register)
    tiles_r, tiles_c = _cdiv(R, rb * tbr), _cdiv(C, cb * tbc)
    codes_b = _bytes_of(codes)
    ccols = (C + 1) // 2 if spec.element.bits == 4 else C  # codes are contiguous over (P, R, C)
    sq_r, sq_p = ccols, R * ccols
    dummy = codes_b
    codes_t = scales_t = zp_t = None
    if dual_out is not None:
        codes_t, scales_t, zp_t = dual_out
    tiles = P * tiles_r * tiles_c
    run = _schedule(rb, cb, tbrp, tbcp, warps, register, dual_out is not None, consts["ASYM"], consts["IS_INT"])
    programs = min(tiles, _persistent_programs(v.device, run.per_sm)) if run.per_sm else tiles
    limits = {} if run.maxnreg is None else dict(maxnreg=run.maxnreg)
    if run.defer:  # the careful tiles' count, then their ids
        stats = torch.zeros(1 + tiles, dtype=torch.int32, device=v.device)
    args = (_input_view(v), codes_b, _bytes_of(grid_s), dummy if grid_zp is None else _bytes_of(grid_zp),
            dummy if stats is None else stats, dummy if given is None else given,
            dummy if codes_t is None else _bytes_of(codes_t), dummy if scales_t is None else _bytes_of(scales_t),
            dummy if zp_t is None else _bytes_of(zp_t),
            R, C, nbr, nbc, br, bc, tiles_r, tiles_c,
            v.stride(0), v.stride(1), v.stride(2), sq_p, sq_r, grid_s.stride(0), grid_s.stride(1),
            0 if scales_t is None else scales_t.stride(0), 0 if scales_t is None else scales_t.stride(1))
    kwargs = dict(RB=rb, TBR=tbr, TBRP=tbrp, CB=cb, TBC=tbc, TBCP=tbcp,
                  SCALE_SRC=0 if register else (1 if stats is not None else 2), BID_ROWS=nbr > 1,
                  BID_COLS=nbc > 1, DUAL=dual_out is not None,
                  PACK4=spec.element.bits == 4, BF16_BITS=_bf16_bits(v),
                  num_warps=run.warps, NUM_TILES=tiles, **consts)
    _quantize_kernel[(programs,)](*args, ONE_BLOCK=2 if run.defer else run.one_block, STAGES=run.stages, **kwargs,
                                  **limits)
    if run.defer:
        _quantize_kernel[(min(tiles, _persistent_programs(v.device, FIXUP_PROGRAMS)),)](
            *args, ONE_BLOCK=1, FIXUP=True, **kwargs)


class Schedule(NamedTuple):
    """How a quantize launch runs (see PERSISTENT_STAGES)."""
    one_block: bool  # each tile is one block
    defer: bool  # careful tiles are left to a FIXUP launch (one-block programs only)
    per_sm: int  # programs an SM of a persistent launch; 0: one tile a program
    stages: int  # STAGES of the kernel: tiles in flight of a persistent program (0: not persistent)
    warps: int
    maxnreg: int | None  # register limit a thread (None: as ptxas chooses)


def _schedule(rb: int, cb: int, tbrp: int, tbcp: int, warps: int, register: bool, dual: bool,
              asym: bool, is_int: bool) -> Schedule:
    """The Schedule of a quantize launch of the given tile geometry (warps: _tile_geometry's)."""
    one_block = register and not dual and rb * cb == 1
    maxnreg, defer = TILE_MAXNREG, False
    if one_block:
        run = ONE_BLOCK_INT if is_int else ONE_BLOCK_FLOAT
        per_sm, defer = run.per_sm, run.defer
        maxnreg = maxnreg or (None if TILE_WARPS else run.maxnreg)  # its limit is for its warps
        thread_elems = run.row_elems if tbrp == 1 else run.tile_elems
        warps = TILE_WARPS or max(4, min(32, tbrp * tbcp // (32 * thread_elems)))
    elif dual:
        per_sm = DUAL_PROGRAMS
        if rb * tbrp * cb * tbcp <= 16384:  # DUAL_WARPS and its register limit are for a 128 x 128 tile
            warps = TILE_WARPS or DUAL_WARPS
            maxnreg = maxnreg or (None if TILE_WARPS else DUAL_MAXNREG)
    elif register and asym:
        per_sm = ASYM_PROGRAMS
        warps = TILE_WARPS or ASYM_WARPS
        maxnreg = maxnreg or (None if TILE_WARPS else ASYM_MAXNREG)
    else:
        per_sm = 0
    return Schedule(one_block, defer, per_sm, PERSISTENT_STAGES if per_sm else 0, warps, maxnreg)


def _persistent_programs(device, per_sm: int) -> int:
    """Programs of a persistent launch: per_sm on each SM (3 under the interpreter, so that programs
    take several tiles there too)."""
    if device.type != "cuda":
        return 3
    return sm_count(device) * per_sm


def _block_stats(v, br, bc, nbr, nbc, asym):
    P, R, C = v.shape
    keep_r, keep_c = br == 1, bc == 1
    tc = min(_pow2_ceil(C), 256) if keep_c else min(_pow2_ceil(C), 256, 1 << (bc.bit_length() - 1))
    tr_cap = max(1, 4096 // tc)
    tr = min(_pow2_ceil(R), tr_cap) if keep_r else min(_pow2_ceil(R), tr_cap, 1 << (br.bit_length() - 1))
    stats = torch.zeros((2 if asym else 1) * nbr * nbc, dtype=torch.float32, device=v.device)
    tiles_r, tiles_c = _cdiv(R, tr), _cdiv(C, tc)
    # Fewer, longer programs (fewer atomics on one address) where the looped dim is one block.
    iters = 1
    if (bc >= C) if keep_r else (br >= R):
        iters = max(1, min(tiles_c if keep_r else tiles_r, P * tiles_r * tiles_c // STATS_PROGRAMS))
        if keep_r:
            tiles_c = _cdiv(tiles_c, iters)
        else:
            tiles_r = _cdiv(tiles_r, iters)
    _block_stats_kernel[(P * tiles_r * tiles_c,)](
        _input_view(v), stats, R, C, nbr, nbc, br, bc, tiles_r, tiles_c, iters, v.stride(0), v.stride(1), v.stride(2),
        TR=tr, TC=tc, KEEP_R=keep_r, KEEP_C=keep_c, ASYM=asym, BF16_BITS=_bf16_bits(v), num_warps=4,
    )
    return stats


def quantize_dual(x: torch.Tensor, spec: QuantSpec, *, scale_layout: str = "row",
                  exact_fp8: bool | None = None):
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
        return quantize(x, spec, scale_layout=scale_layout), quantize(x.T, spec, scale_layout=scale_layout)
    consts = element_constants(spec, exact_fp8)
    M, K = x.shape
    v = x.reshape(1, M, K)
    outs = []
    for shape in ((M, K), (K, M)):
        sshape = spec.scale_shape(shape)
        outs.append((torch.empty(shape, dtype=spec.code_dtype, device=x.device),
                     scale_tensor(sshape, spec.scale_dtype, x.device, scale_layout),
                     scale_tensor(sshape, torch.int8, x.device, scale_layout) if consts["ASYM"] else None))
    (codes, stored, zps), (codes_t, stored_t, zps_t) = outs
    cb = max(1, min(_pow2_ceil(_cdiv(K, g)), max(1, TILE_ELEMS // (g * g))))
    geometry = (g, 1, 1, cb, g, g, _warps(g * g * cb))
    _launch_quantize(v, codes, stored, zps, None, None, 1, g, M, _cdiv(K, g), True, consts, spec,
                     dual_out=(codes_t, stored_t, zps_t), geometry=geometry)
    return (QuantizedTensor(codes, stored, spec, (M, K), zps), QuantizedTensor(codes_t, stored_t, spec, (K, M), zps_t))


def _to_device(qt: QuantizedTensor, device) -> QuantizedTensor:
    zp = None if qt.zero_points is None else qt.zero_points.to(device)
    return QuantizedTensor(qt.codes.to(device), qt.scales.to(device), qt.spec, qt.shape, zp)
