"""Element arithmetic and tile indexing shared by the Triton quantize and dequantize kernels.

The format a kernel codes is one constexpr bundle, FMT (quantize_plan.ElementConstants: QMAX, IS_INT,
ASYM, POW2, MX, EMAX, NBITS, MBITS, EMIN, BIAS, NAN_CODE, HW_FP8, EXACT_FP8), and a tile's geometry
another, TILE (quantize_plan.Tile: RB, TBR, TBRP, CB, TBC, TBCP). Every code is that of the IEEE
quotient x / scale, as in the reference; quotient says how each kind of program gets it without an
IEEE division per element where it can.
"""
from __future__ import annotations

import triton
import triton.language as tl

# FMT.HW_FP8: how a float code is made (see encode_float).
SOFT_FP8 = tl.constexpr(0)  # integer arithmetic (E2M1, and fp8 under EXACT_FP8)
HW_E4M3 = tl.constexpr(1)  # the hardware cast to float8e4nv
HW_E5M2 = tl.constexpr(2)  # the hardware cast to float8e5

@triton.jit
def exponent(a):
    """floor(log2(a)) of non-negative fp32 `a` from its bits; -127 for zero and subnormals."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def pow2(e):
    """2**e as fp32 for int32 e in [-127, 127] (2**-127 is a subnormal)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 1 << tl.maximum(e + 149, 0))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rint(v):
    """Round fp32 |v| <= 2**22 to an integer, ties to even (exact: the sum's rounding does it)."""
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23


@triton.jit
def rint_int32(v):
    """rint(v) as int32, read off the bits of the same sum (no float -> int conversion)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


# How x / scale is computed (see quotient).
DIVIDE = tl.constexpr(0)
RECIPROCAL = tl.constexpr(1)
CORRECTED = tl.constexpr(2)
CORRECTED_ANY_ZERO = tl.constexpr(3)
GUARDED = tl.constexpr(4)
# Scales within which CORRECTED is exact for every quotient that can change a code (and x finite).
CORRECTED_MIN = tl.constexpr(2.0 ** -80)
CORRECTED_MAX = tl.constexpr(2.0 ** 100)


@triton.jit
def corrected(x, d, r):
    """x / d by quotient's corrected steps (CORRECTED_ANY_ZERO) with r = RN(1 / d): x * r corrected once by the
    exact remainder. -d: the block's or a constant, exact (Triton's -q0 would be 0 - q0, an extra op)."""
    q0 = x * r
    return tl.fma(tl.fma(q0, -d, x), r, q0)


@triton.jit
def scale_ratio(amax, FMT: tl.constexpr, QUOTIENT: tl.constexpr):
    """amax / FMT.DIVISOR rounded as IEEE division: by div.rn (QUOTIENT DIVIDE), or by quotient's corrected steps with
    FMT.RDIVISOR = RN(1 / DIVISOR) (CORRECTED_ANY_ZERO): the IEEE quotient for every finite fp32 amax whose quotient
    is a normal number (divisors 127 and 255: every finite amax; all 2**31 searched for each divisor, NUMERICS.md),
    an infinite amax giving NaN (a careful block: its amax check sees the Inf; block_scale keeps an overflowed
    INT8 asym span infinite, the one case where the amax check cannot)."""
    if QUOTIENT == CORRECTED_ANY_ZERO:
        ratio = corrected(amax, FMT.DIVISOR, FMT.RDIVISOR)
    else:
        ratio = tl.math.div_rn(amax, FMT.DIVISOR)
    return ratio


@triton.jit
def block_scale(amax, nlo, FMT: tl.constexpr, QUOTIENT: tl.constexpr = DIVIDE):
    """(scale, zero point) of a block from its finite amax (or, for FMT.ASYM, hi = amax and lo = -nlo).

    QUOTIENT: DIVIDE, or CORRECTED_ANY_ZERO where the block is then checked to be careless (finite amax, or hi and
    lo, and a scale within [CORRECTED_MIN, CORRECTED_MAX]) before the values are used: the ratio to the format's
    divisor (scale_ratio) and the zero point's lo / scale by quotient's corrected steps, no IEEE division, the same
    values there; an overflowed span gives an infinite scale (careful)."""
    zp = tl.zeros_like(amax)
    if FMT.ASYM:
        span = amax + nlo  # hi - lo with lo = -nlo: exact negation, one rounding as in the reference
        scale = tl.where(span < float("inf"), scale_ratio(span, FMT, QUOTIENT), span)
        scale = tl.where(scale > 0, scale, 1.0)
        zp = -(FMT.QMAX + 1) - rint(quotient(-nlo, scale, QUOTIENT))
    elif FMT.POW2:
        if FMT.MX:
            scale = pow2(mx_scale_exponent(exponent(amax), FMT.EMAX))
        else:
            ratio = scale_ratio(amax, FMT, QUOTIENT)
            e = exponent(ratio) + ((ratio.to(tl.int32, bitcast=True) & 0x7FFFFF) != 0).to(tl.int32)
            scale = pow2(scale_exponent(e, amax > 0))
    else:
        scale = scale_ratio(amax, FMT, QUOTIENT)
        scale = tl.where(scale > 0, scale, 1.0)
    return scale, zp


@triton.jit
def corrected_block_scale(hi, nlo, FMT: tl.constexpr, QUOTIENT: tl.constexpr = CORRECTED_ANY_ZERO):
    """(scale, zero point, wild) of blocks from their NaN-keeping amax (FMT.ASYM: hi and -lo) by block_scale's
    corrected steps (QUOTIENT DIVIDE: its IEEE divisions, the same values); wild where the amax met an Inf or NaN or
    the scale is outside [CORRECTED_MIN, CORRECTED_MAX], the blocks for which those steps, and the corrected
    quotients of their codes, are not exact (a tile holding one is careful)."""
    scale, zp = block_scale(tl.maximum(hi, 0.0), tl.maximum(nlo, 0.0), FMT, QUOTIENT)
    wild = (scale < CORRECTED_MIN) | (scale > CORRECTED_MAX) | ~(hi < float("inf"))
    if FMT.ASYM:
        wild = wild | ~(nlo < float("inf"))
    return scale, zp, wild


@triton.jit
def store_scales(scales_ptr, zp_ptr, offsets, mask, scale, zp, FMT: tl.constexpr):
    """Store blocks' scales (stored_scale) and, ASYM, zero points at `offsets` of their grids."""
    tl.store(scales_ptr + offsets, stored_scale(scale, FMT.POW2), mask=mask)
    if FMT.ASYM:
        tl.store(zp_ptr + offsets, zp.to(tl.int32).to(tl.uint8), mask=mask)


@triton.jit
def clamp_exponent(e):
    """e clamped to E8M0's [-127, 127]."""
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def scale_exponent(e, nonzero):
    """The exponent of an FP8/INT8 power-of-two scale: e clamped; 0 for an all-zero block."""
    return tl.where(nonzero, clamp_exponent(e), 0)


@triton.jit
def mx_scale_exponent(amax_exponent, EMAX: tl.constexpr):
    """The OCP MX scale exponent floor(log2(amax)) - emax, clamped: an all-zero block (amax exponent -127)
    gets -127, E8M0 0, as the OCP reference library and torchao write it."""
    return clamp_exponent(amax_exponent - EMAX)


@triton.jit
def stored_scale(scale, POW2: tl.constexpr):
    """What the scale tensor holds: fp32, or the E8M0 byte of floor(log2(scale))."""
    if POW2:
        stored = (clamp_exponent(exponent(scale)) + 127).to(tl.uint8)
    else:
        stored = scale
    return stored


@triton.jit
def quotient(x, scale, QUOTIENT: tl.constexpr):
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
    GUARDED: CORRECTED for any x, the caller guaranteeing only the scale's range: where |q0| >= 2**17
    (x Inf, or a quotient that saturates every format: their largest codes are below 2**17) or q0 is NaN
    (x NaN), q0 itself, whose code is the IEEE quotient's. (The select stays: without it, by tiles whose amax shows
    it idle or by a clamp of q0 in Triton or in PTX, ptxas 12.8 merged one FP8 code byte a thread from a wrong
    register, and none was faster: BENCHMARKS.md, 2026-12-06 11:19 UTC.)
    """
    if QUOTIENT == RECIPROCAL:
        q = x * tl.math.div_rn(1.0, scale)
    elif QUOTIENT == CORRECTED or QUOTIENT == CORRECTED_ANY_ZERO or QUOTIENT == GUARDED:
        r = tl.math.div_rn(1.0, scale)
        if QUOTIENT == CORRECTED_ANY_ZERO:  # int8 has one zero: the sign of a zero quotient does not matter
            q = corrected(x, scale, r)
        else:
            q0 = x * r
            # The negated remainder q0 * scale - x times -r: for x = +-0 both products are zeros of x's sign's
            # opposite and the sum keeps x's sign (q0 + (x - q0 * scale) * r would make -0 a +0); for any other
            # x the same value, as rounding to nearest is symmetric. (x * -1.0 is an exact negation, -0 included.)
            q = tl.fma(tl.fma(q0, scale, x * -1.0), r * -1.0, q0)
        if QUOTIENT == GUARDED:
            q = tl.where(tl.abs(q0) < 131072.0, q, q0)
    else:
        q = tl.math.div_rn(x, scale)
    return q


@triton.jit
def encode(x, scale, zp, FMT: tl.constexpr, QUOTIENT: tl.constexpr):
    """Code bits (int32; two's complement for int8) of fp32 `x` under `scale` (and `zp`).

    QUOTIENT: how x / scale is computed (see quotient).
    """
    return encode_quotient(x, quotient(x, scale, QUOTIENT), zp, FMT)


@triton.jit
def encode_quotient(x, q, zp, FMT: tl.constexpr, FINITE: tl.constexpr = False):
    """Code bits of the quotients q = x / scale (see encode).

    FINITE (int8 asym): every x is finite and q = x / scale of the block's own scale, so |q| <= 2 * 128: no
    clamp before rounding, no select for NaN, and no clamp at -128: the block's lo <= x gives rint(q) >=
    rint(lo / scale) (rounding is monotonic; a corrected quotient that may differ from the IEEE one is below
    2**-20 and rounds to 0 as that does), and zp = -128 - rint(lo / scale). (The top needs its clamp: with
    scale = RN(span / 255) rint(hi / scale) - rint(lo / scale) may be 256.)"""
    if FMT.ASYM and FINITE:
        bits = tl.minimum(rint_int32(q) + zp.to(tl.int32), 127)
    elif FMT.IS_INT:
        # int8 is the one integer format.
        if FMT.ASYM:
            zpi = zp.to(tl.int32)
            c = rint_int32(tl.minimum(tl.maximum(q, -2.0 * (FMT.QMAX + 1)), 2.0 * (FMT.QMAX + 1))) + zpi
            c = tl.minimum(tl.maximum(c, -128), 127)
            bits = tl.where(x != x, zpi, tl.where(q != q, 0, c))
        else:
            bits = tl.where(q != q, 0, rint_int32(tl.minimum(tl.maximum(q, -FMT.QMAX), FMT.QMAX)))
        # A NaN quotient of a non-NaN x (Inf / Inf when span overflowed) is stored as torch
        # stores NaN in int8: 0. (min/max may drop NaN, so this is tested on q.)
    else:
        bits = encode_float(q, FMT)
    return bits


@triton.jit
def e2m1(q, x):
    """E2M1 code bits of fp32 quotients q = x / s (s > 0): round to nearest even, +-Inf and overflow
    saturate to +-6, the sign (that of -0 too) is x's, NaN x -> 0 (E2M1 has no NaN; the reference's
    NAN_CODE). A NaN q of a non-NaN x (Inf x under a corrected quotient) saturates: the minimum takes
    6. |q| >= 1 rounds the fp32 bits to one mantissa bit (a carry moves into the exponent) and re-biases;
    |q| < 1 lies on the grid of 0.5, rounded by an fp32 addition."""
    a = tl.minimum(tl.abs(q), 6.0)
    b = a.to(tl.int32, bitcast=True)
    normal = ((b + 0x1FFFFF + ((b >> 22) & 1)) >> 22) - 252
    sub = (a * 2.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    bits = tl.where(a < 1.0, sub, normal) | ((x.to(tl.int32, bitcast=True) >> 28) & 8)
    return tl.where(x != x, 0, bits)


@triton.jit
def max_nan(a, b):
    """Maximum, NaN where either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_nan(a, b):
    """Minimum, NaN where either is NaN."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def defer_tile(list_ptr, tile):
    """Append `tile` to a list of careful tiles (its count, then the tiles) for a second launch."""
    slot = tl.atomic_add(list_ptr, 1)
    tl.store(list_ptr + 1 + slot, tile)


@triton.jit
def prefetch_lines(x_ptr, first_row, ROWS: tl.constexpr, first_col, WIDTH: tl.constexpr, R, C, sx_r):
    """Ask L2 for every line of rows [first_row, first_row + ROWS) x columns [first_col, first_col + WIDTH) of a
    row-major input (column stride 1; the caller checks), no register waiting for it (prefetch.global.L2, sm_90
    PTX): the line of each 128-byte step along a row and of its last element, so that every line the rows' loads
    touch is requested at once and those loads then wait on L2 rather than on memory."""
    STEP: tl.constexpr = 128 // (x_ptr.dtype.element_ty.primitive_bitwidth // 8)
    POINTS: tl.constexpr = 2 * (WIDTH // STEP) if WIDTH >= STEP else 2  # a power of two, the last ones clipped
    rows = first_row + tl.arange(0, ROWS)[:, None]
    cols = tl.minimum(first_col + tl.minimum(tl.arange(0, POINTS)[None, :] * STEP, WIDTH - 1), C - 1)
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [x_ptr + rows.to(tl.int64) * sx_r + cols, (rows < R).to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def fp8_words(q, FMT: tl.constexpr):
    """int32 words of the fp8 codes of fp32 quotients q [A, B, C, D] (as encode_float's), four consecutive along
    the last axis a word (element 4i in the low byte): [A, B, C, D / 4]. By the hardware cast, two
    cvt.rn.satfinite x2 a word (sm_90 PTX); under EXACT_FP8 (or without a hardware cast) encode_float's integer
    arithmetic, the bytes shifted into place."""
    a, b = tl.split(tl.reshape(q, [q.shape[0], q.shape[1], q.shape[2], q.shape[3] // 4, 2, 2]))  # 4i + 2j, 4i + 2j + 1
    q0, q2 = tl.split(a)
    q1, q3 = tl.split(b)
    if FMT.HW_FP8 != SOFT_FP8 and not FMT.EXACT_FP8:
        if FMT.HW_FP8 == HW_E4M3:
            asm: tl.constexpr = ("{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
                                 "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")
        else:
            asm: tl.constexpr = ("{ .reg .b16 lo, hi; cvt.rn.satfinite.e5m2x2.f32 lo, $2, $1; "
                                 "cvt.rn.satfinite.e5m2x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }")
        words = tl.inline_asm_elementwise(asm, "=r,f,f,f,f", [q0, q1, q2, q3], dtype=tl.int32, is_pure=True, pack=1)
    else:
        words = encode_float(q0, FMT) | (encode_float(q1, FMT) << 8) | (encode_float(q2, FMT) << 16) \
            | (encode_float(q3, FMT) << 24)
    return words


@triton.jit
def fp8_pairs(lo, hi, FMT: tl.constexpr):
    """int16 words of the fp8 codes of fp32 quotient pairs (lo in the low byte), as encode_float's: by one
    cvt.rn.satfinite x2 a pair (sm_90 PTX: round to nearest even, +-Inf and overflow saturated, NaN to 0x7F); under
    EXACT_FP8 by encode_float's integer arithmetic."""
    if FMT.HW_FP8 != SOFT_FP8 and not FMT.EXACT_FP8:
        if FMT.HW_FP8 == HW_E4M3:
            asm: tl.constexpr = "cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;"
        else:
            asm: tl.constexpr = "cvt.rn.satfinite.e5m2x2.f32 $0, $2, $1;"
        pairs = tl.inline_asm_elementwise(asm, "=h,f,f", [lo, hi], dtype=tl.int16, is_pure=True, pack=1)
    else:
        pairs = (encode_float(lo, FMT) | (encode_float(hi, FMT) << 8)).to(tl.int16)
    return pairs


@triton.jit
def bf16_halves(w):
    """The fp32 values (lo, hi) of the two bf16 elements of int32 words w (element 2i in the low half)."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def max_u16x2(a, b):
    """Maximum of each 16-bit half of int32 words (sm_90 PTX)."""
    return tl.inline_asm_elementwise("max.u16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def max_magnitude_bits(w, axis: tl.constexpr):
    """The largest magnitude bits (sign cleared) among both 16-bit halves of int32 words w along `axis` (kept):
    16-bit floats order as their magnitude bits do, so this is their amax's bits, reduced on both halves at once
    (max.u16x2: PTX, launch.inline_ptx)."""
    mag = tl.reduce(w & 0x7FFF7FFF, axis, max_u16x2, keep_dims=True)
    return tl.maximum(mag & 0xFFFF, mag >> 16)


@triton.jit
def max_into(ptr, m, seen):
    """Max the non-negative float m into *ptr, by an atomic only where m exceeds `seen`, a value *ptr held earlier
    (seen_max: a volatile load the program issues with its input's loads, so that its latency hides behind theirs):
    every program of a pass maxes into one address, whose atomics run one at a time, while loads of it run side by
    side (an NVFP4 pass of 262,144 programs with the amax: 0.242 ms against 0.416 ms by an atomic each, H200). Exact
    and order independent: *ptr only grows, so where m <= seen, m <= *ptr and was never the maximum. The atomic is
    relaxed: nothing orders against it within the launch (acq_rel put a MEMBAR.ALL.GPU before it, which waits for
    the program's earlier stores)."""
    if m > seen:
        tl.atomic_max(ptr, m, sem="relaxed")


@triton.jit
def seen_max(ptr):
    """What *ptr holds now (a volatile load: not cached, not merged with a later one), for max_into."""
    return tl.load(ptr, volatile=True)


@triton.jit
def encode_float(q, FMT: tl.constexpr):
    """Minifloat code bits of quotients `q`: clamp, round to nearest even, NaN -> FMT.NAN_CODE."""
    QMAX: tl.constexpr = FMT.QMAX
    NBITS: tl.constexpr = FMT.NBITS
    MBITS: tl.constexpr = FMT.MBITS
    EMIN: tl.constexpr = FMT.EMIN
    BIAS: tl.constexpr = FMT.BIAS
    if NBITS == 4:
        bits = e2m1(q, q)
    elif FMT.HW_FP8 != SOFT_FP8 and not FMT.EXACT_FP8:
        # The hardware conversion (cvt.rn.satfinite) is the reference's encoding: it rounds to
        # nearest even, saturates +-Inf and overflow to +-max, and writes 0x7F (NAN_CODE) for NaN.
        if FMT.HW_FP8 == HW_E4M3:
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
        bits = tl.where(q != q, FMT.NAN_CODE, bits)
    return bits


@triton.jit
def grid_tile(ROWS_X: tl.constexpr):
    """(tile row, tile column) of a program of quantize_plan.row_tile_grid's launch."""
    if ROWS_X:
        tile_r, tile_c = tl.program_id(0), tl.program_id(1)
    else:
        tile_r, tile_c = tl.program_id(1), tl.program_id(0)
    return tile_r, tile_c


@triton.jit
def tile_coords(pid, R, C, TILES_R, TILES_C, TILE: tl.constexpr):
    """Tile `pid`: RB x CB sub-tiles (TBR x TBC, padded to TBRP x TBCP; the fields of TILE) over the
    (P, R, C) view.

    Returns (p, pid_r, pid_c, rb, i, cb, j, rows, cols, valid): the 4-D [RB, TBRP, CB, TBCP] index
    pieces, the element rows and columns, and the mask of real elements.
    """
    RB: tl.constexpr = TILE.RB
    TBR: tl.constexpr = TILE.TBR
    TBRP: tl.constexpr = TILE.TBRP
    CB: tl.constexpr = TILE.CB
    TBC: tl.constexpr = TILE.TBC
    TBCP: tl.constexpr = TILE.TBCP
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
def block_ids(rows, cols, BR, BC, NBR, NBC, BID_ROWS: tl.constexpr, BID_COLS: tl.constexpr):
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
def load_fp32(ptrs, mask, BF16_BITS: tl.constexpr):
    """Load as fp32. BF16_BITS: the input is bf16 viewed as int16 (the interpreter's bf16 -> fp32 cast loses
    subnormals). bf16 is widened on its bits either way, the same values as the cast: compiled for sm_90 (triton
    3.6) that takes one instruction an element, a shift or a mask of the loaded word, where the cast takes a byte
    permute more for every second element."""
    return widen_fp32(tl.load(ptrs, mask=mask, other=0), BF16_BITS)


@triton.jit
def widen_fp32(x, BF16_BITS: tl.constexpr):
    """Loaded elements x as fp32, as load_fp32 widens them."""
    if BF16_BITS or x.dtype == tl.bfloat16:
        x = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def below_inf(x):
    """x where it is below +Inf, else 0 (+Inf and NaN)."""
    return tl.where(x < float("inf"), x, 0.0)


@triton.jit
def finite_abs(x):
    return below_inf(tl.abs(x))


@triton.jit
def finite_amax(x):
    """The largest finite |x| of fp32 x (1-D; 0.0 if none): the max of |x| (one max an element, which passes over
    NaN as tl.maximum does on the GPU), the finite elements' taken again (finite_abs) only where that max is Inf or
    NaN (the interpreter's max keeps NaN)."""
    m = tl.max(tl.abs(x))
    if (m != m) | (m == float("inf")):
        m = tl.max(finite_abs(x))
    return m


# SPECIALS of decode_minifloat: which codes are not numbers.
NO_SPECIALS = tl.constexpr(0)  # E2M1
NAN_ALL_ONES = tl.constexpr(1)  # fn formats (E4M3): all-ones is NaN, no Inf
IEEE_SPECIALS = tl.constexpr(2)  # E5M2: the top exponent is Inf (mantissa 0) or NaN


@triton.jit
def decode_minifloat(b, NBITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                      SPECIALS: tl.constexpr):
    """fp32 value of minifloat bits `b` (int32); SPECIALS: NO_SPECIALS, NAN_ALL_ONES or IEEE_SPECIALS."""
    e = (b >> MBITS) & ((1 << EBITS) - 1)
    m = b & ((1 << MBITS) - 1)
    # Normal codes move their fields into fp32's; subnormal ones are m * 2**(1 - BIAS - MBITS).
    normal = ((e + (127 - BIAS)) << 23) | (m << (23 - MBITS))
    sub = m.to(tl.float32) * (tl.zeros_like(e) + ((1 - BIAS - MBITS + 127) << 23)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, sub, normal.to(tl.float32, bitcast=True))
    if SPECIALS == NAN_ALL_ONES:
        mag = tl.where((e == (1 << EBITS) - 1) & (m == (1 << MBITS) - 1), float("nan"), mag)
    if SPECIALS == IEEE_SPECIALS:
        mag = tl.where(e == (1 << EBITS) - 1, tl.where(m == 0, float("inf"), float("nan")), mag)
    # The sign goes on as a bit: Triton's -x is 0 - x, which loses the sign of zero.
    sign = ((b >> (NBITS - 1)) & 1) << 31
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_value(b):
    """fp32 value of E4M3 (float8_e4m3fn) bits `b` (int32): NVFP4's block scales."""
    return decode_minifloat(b, 8, 4, 3, 7, NAN_ALL_ONES)


@triton.jit
def e8m0_bf16x2(e):
    """Two bf16 copies of 2**(e - 127) in an int32 word for E8M0 bits e (0 gives the bf16 subnormal
    2**-127, 255 NaN): every factor is exact in bf16, whose exponent range is fp32's."""
    e = e.to(tl.int32)
    h = tl.where(e == 0, 0x0040, tl.where(e == 255, 0x7FC0, e << 7))
    return h | (h << 16)


# PTX of e2m1x2_scaled and e2m1x2_times: register m gets the bf16x2 word of the exact values of the two E2M1
# codes in byte $1 (element 2i in the low half).
_E2M1X2_VALUES = """
        {
        .reg .b32 m, s, c, lo, hi;
        mul.lo.u32 m, $1, 0x00040040;
        mul.lo.u32 s, $1, 0x01001000;
        and.b32 m, m, 0x01C001C0;
        and.b32 s, s, 0x80008000;
        or.b32 m, m, s;
        mov.b32 c, 0x7E807E80;
        mul.rn.bf16x2 m, m, c;
"""
_E2M1X2_SCALED = tl.constexpr(_E2M1X2_VALUES + """
        mul.rn.bf16x2 $0, m, $2;
        }
""")


def _e2m1x2_times_ptx(half: str) -> tl.constexpr:
    return tl.constexpr(_E2M1X2_VALUES + f"""
        shl.b32 lo, m, 16;
        and.b32 hi, m, 0xFFFF0000;
        mul.rn.f32 lo, lo, $2;
        mul.rn.f32 hi, hi, $2;
        cvt.rn.{half}x2.f32 $0, hi, lo;
        }}
""")


_E2M1X2_TIMES_BF16, _E2M1X2_TIMES_F16 = _e2m1x2_times_ptx("bf16"), _e2m1x2_times_ptx("f16")


@triton.jit
def e2m1x2_scaled(b, f):
    """bf16x2 words (element 2i in the low half) of E2M1 code bytes b (int32 0..255, element 2i in the
    low nibble) times the bf16x2 factors f (sm_90 PTX).

    Each nibble s e1 e0 m becomes the bf16 with sign s, exponent field e1 e0 and mantissa top bit m
    (the copies of b at shifts 6/18 put the magnitude bits at 6..8/22..24, those at 12/24 the signs at
    15/31; the copies never overlap, so the products are ORs). That bf16 is the code's value times
    2**-126: exponent field 0 is the subnormal 2**-127 (m = 1: 0.5) or zero. Two bf16 multiplies,
    by 2**126 (giving the code's value) and by the factor, are exact wherever the result is a bf16
    (two significant bits times a power of two in [2**-128, 1.5 * 2**129]), round to +-Inf past bf16's
    range, as the fp32 path's cast does, and give NaN for a NaN factor. A single multiply by
    2**(s - 1) would leave bf16's range for scales s > 128. tests/test_triton_gemm.py models every
    step in torch for every code pair and scale (test_packed_mxfp4_decode_is_the_fp32_decode).
    """
    return tl.inline_asm_elementwise(asm=_E2M1X2_SCALED, constraints="=r,r,r", args=[b, f], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def e2m1x2_times(b, d, F16: tl.constexpr):
    """Half-precision pairs (bf16x2, or f16x2 for F16; element 2i in the low half) of E2M1 code bytes b (as
    e2m1x2_scaled) times the fp32 multiplier d (sm_90 PTX): each the fp32 product code x d rounded once to the
    half type, as reference.dequantize computes it. The codes' exact bf16 values widen to fp32 by a shift and a
    mask, the fp32 multiplies are IEEE's (.rn: neither fused nor flushing subnormals) and one cvt rounds both
    products to nearest even (+-Inf past the half type's range, NaN for NaN)."""
    return tl.inline_asm_elementwise(asm=_E2M1X2_TIMES_F16 if F16 else _E2M1X2_TIMES_BF16, constraints="=r,r,f",
                                     args=[b, d], dtype=tl.int32, is_pure=True, pack=1)
