"""Host-side planning of the Triton quantize and dequantize launches: how a tensor is seen as blocks,
the constexprs of its format, the tile a program covers and how the programs of a launch run.

Every granularity is seen through one geometry: the input viewed as (P, R, C) with strides, blocks of
(BR, BC) elements over the (R, C) plane, shared by all P (P > 1 only for a channel axis in the middle of
the tensor). Scales are laid out as the (NBR, NBC) grid of blocks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy
import torch

from .config import KernelConfig
from .launch import interpreting, sm_count
from .spec import E2M1, E4M3, E5M2, Format, Granularity, QuantSpec, ScaleEncoding, _cdiv
from .triton_elements import HW_E4M3, HW_E5M2, SOFT_FP8

# Padded elements a block may have to be reduced in registers; larger ones take two passes.
MAX_REGISTER_BLOCK = 16384


class ElementConstants(NamedTuple):
    """The kernels' FMT constexpr: a format's constants, read off spec.element (see element_constants)."""
    QMAX: float  # the largest code magnitude
    DIVISOR: float  # a block's scale is its amax (int8_asym: hi - lo) over DIVISOR: QMAX (int8_asym: 2 * QMAX + 1)
    RDIVISOR: float  # RN(1 / DIVISOR) in fp32 (triton_elements.scale_ratio)
    IS_INT: bool
    ASYM: bool  # int8_asym: codes carry a zero point
    POW2: bool  # power-of-two scales, stored as E8M0
    MX: bool  # OCP MX scale rule (floor(log2 amax) - EMAX)
    EMAX: int  # exponent of the largest binade (floats; 0 for int8)
    NBITS: int
    MBITS: int
    EMIN: int
    BIAS: int
    NAN_CODE: int  # bits written for NaN (0 where the format has no NaN)
    HW_FP8: int  # triton_elements.SOFT_FP8, HW_E4M3 or HW_E5M2
    EXACT_FP8: bool  # fp8 codes by integer arithmetic, not the hardware cast
    GUARDED: bool = False  # stats and given scales divide by the guarded corrected quotient (KernelConfig)
    TILE_DIVIDE: bool = False  # a one-block register tile's scale by IEEE division (KernelConfig.one_block_divide)
    # A register tile's amax keeps NaN by max.NaN reductions (tl.reduce with a NaN-propagating combine), or, where
    # interpreted (whose tl.reduce calls a Python combine function at every step, 5-25x slower on CI's tiles), by
    # tl.max and a count of NaN: the same values.
    NAN_COMBINE: bool = True


class Tile(NamedTuple):
    """The kernels' TILE constexpr: RB x CB sub-tiles of TBR x TBC elements, padded to TBRP x TBCP."""
    RB: int
    TBR: int
    TBRP: int
    CB: int
    TBC: int
    TBCP: int

    @property
    def elems(self) -> int:
        return self.RB * self.TBRP * self.CB * self.TBCP


class DualPlan(NamedTuple):
    """The DUAL_PLAN constexpr of quantize_dual's launches (KernelConfig.dual_*, triton_quantize.dual_plan): the slabs
    a tile is taken in (SLABS, the next one's load issued early: PREFETCH), its columns' slabs' columns a thread and
    rows across lanes (COLS, ROWS, ROWS at most the tile's rows; 0, 0: the layout Triton picks from the loads),
    careful tiles found once a tile rather than once a slab (LATE), the whole tile asked of L2 before its first slab
    is loaded (L2), and X^T's fp8 codes made and stored four rows to a word (WORDS: R a multiple of 4)."""
    SLABS: int = 1
    PREFETCH: bool = False
    COLS: int = 0
    ROWS: int = 0
    LATE: bool = False
    L2: bool = False
    WORDS: bool = False


class Schedule(NamedTuple):
    """How a quantize launch runs (see KernelConfig.persistent_stages)."""
    one_block: bool  # each tile is one block
    defer: bool  # careful tiles are left to a FIXUP launch (one-block tiles; dual and INT8 asym where configured)
    per_sm: int  # programs an SM of a persistent launch; 0: one tile a program
    stages: int  # STAGES of the kernel: tiles in flight of a persistent program (0: not persistent)
    warps: int
    maxnreg: int | None  # register limit a thread (None: as ptxas chooses)


def pow2_ceil(n: int) -> int:
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


def element_constants(spec: QuantSpec, exact_fp8: bool | None = None, guarded: bool = False,
                      tile_divide: bool = False) -> ElementConstants:
    """The kernels' FMT constexpr of `spec` (exact_fp8 None: integer fp8 codes only when interpreted; guarded:
    KernelConfig.guarded_quotient; tile_divide: KernelConfig.one_block_divide)."""
    el = spec.element
    hw = SOFT_FP8.value
    if el.kind == "float" and el is not E2M1:
        hw = {E4M3.code_dtype: HW_E4M3.value, E5M2.code_dtype: HW_E5M2.value}.get(el.code_dtype, hw)
    asym = spec.format == Format.INT8_ASYM
    divisor = 2 * float(el.max) + 1 if asym else float(el.max)
    reciprocal = float(numpy.float32(1.0) / numpy.float32(divisor))  # numpy: a plan's recording takes no torch op
    return ElementConstants(
        QMAX=float(el.max), DIVISOR=divisor, RDIVISOR=reciprocal, IS_INT=el.kind == "int", ASYM=asym,
        POW2=spec.scale_encoding == ScaleEncoding.POW2, MX=spec.is_mx, EMAX=el.emax if el.kind == "float" else 0,
        NBITS=el.bits, MBITS=el.mbits, EMIN=el.emin, BIAS=el.bias, NAN_CODE=el.nan_code if el.has_nan else 0,
        HW_FP8=hw, EXACT_FP8=interpreting() if exact_fp8 is None else bool(exact_fp8), GUARDED=guarded,
        TILE_DIVIDE=tile_divide, NAN_COMBINE=not interpreting(),
    )


def tile_geometry(br: int, bc: int, rows: int, cols: int, register: bool, config: KernelConfig,
                  tile_elems: int | None = None, asym: bool = False, amax: bool = False) -> tuple[Tile, int]:
    """(Tile, num_warps) of a quantize/dequantize tile.

    register: the tile is made of whole BR x BC blocks; else of 1 x TBC strips. tile_elems: the elements
    a tile aims at (default config.tile_elems, or for row groups in registers config.group_tile's, INT8 asym's
    config.asym_tile's, for strips config.lookup_tile's, or lookup_tile_amax's for programs that report the amax).
    """
    group_warps = None
    group_tile = config.asym_tile if asym else config.group_tile
    if tile_elems is None and register and br == 1 and group_tile is not None:
        tile_elems, group_warps = group_tile
    elif tile_elems is None and not register:
        lookup = config.lookup_tile_amax if amax else config.lookup_tile
        if lookup is not None:
            tile_elems, group_warps = lookup
    tile_elems = tile_elems or config.tile_elems
    if register:  # whole blocks in registers
        tbr, tbc = br, bc
        tbrp, tbcp = pow2_ceil(br), pow2_ceil(bc)
    else:  # any tile; blocks are looked up
        tbr, tbc = 1, min(pow2_ceil(cols), 1024)
        tbrp, tbcp = 1, tbc
    per_block = tbrp * tbcp
    cb = max(1, min(pow2_ceil(_cdiv(cols, tbc)), tile_elems // per_block))
    rb = max(1, min(pow2_ceil(_cdiv(rows, tbr)), tile_elems // (per_block * cb)))
    tile = Tile(rb, tbr, tbrp, cb, tbc, tbcp)
    return tile, config.tile_warps or group_warps or warps(tile.elems // 2 if register and tbrp == 1 else tile.elems,
                                                           config)


def warps(elems: int, config: KernelConfig) -> int:
    """Warps of a program over `elems` elements: 32 elements a thread, or 64 for row groups
    (their amax stays within a warp), as measured on an H100 (benchmarks/quantize.py --sweep)."""
    return config.tile_warps or max(4, min(16, elems // 1024))


def schedule(tile: Tile, warps: int, register: bool, dual: bool, asym: bool, is_int: bool,
             config: KernelConfig) -> Schedule:
    """The Schedule of a quantize launch of the given tile geometry (warps: tile_geometry's)."""
    one_block = register and not dual and tile.RB * tile.CB == 1
    maxnreg, defer = config.tile_maxnreg, False
    if one_block:
        run = config.one_block_int if is_int else config.one_block_float
        per_sm, defer = run.per_sm, run.defer
        row = tile.TBRP == 1
        maxnreg = maxnreg or (None if config.tile_warps else run.row_maxnreg if row else run.maxnreg)  # for its warps
        thread_elems = run.row_elems if row else run.tile_elems
        warps = config.tile_warps or max(4, min(32, tile.TBRP * tile.TBCP // (32 * thread_elems)))
    elif dual:
        per_sm, defer = config.dual_programs, config.dual_defer
        if tile.elems <= 16384:  # dual_warps and its register limit are for a 128 x 128 tile
            warps = config.tile_warps or config.dual_warps
            maxnreg = maxnreg or (None if config.tile_warps else config.dual_maxnreg)
    elif register and asym:
        per_sm = config.asym_programs
        maxnreg = maxnreg or (None if config.tile_warps else config.asym_maxnreg)
        defer = config.asym_defer
    else:
        per_sm = 0
    return Schedule(one_block, defer, per_sm, config.persistent_stages if per_sm else 0, warps, maxnreg)


def persistent_programs(device, per_sm: int) -> int:
    """Programs of a persistent launch: per_sm on each SM (3 under the interpreter, so that programs
    take several tiles there too)."""
    if device.type != "cuda":
        return 3
    return sm_count(device) * per_sm


def narrow_launch(launch: tuple, row_blocks: int) -> tuple:
    """(rows, blocks a row, warps) of a pairs launch (KernelConfig.nvfp4_launch, mxfp4_pairs_launch) for rows of
    `row_blocks` blocks: a tile wider than the rows trades its blocks a row for rows, keeping its size."""
    rows, groups, warps = launch
    fit = min(groups, pow2_ceil(row_blocks))
    return rows * (groups // fit), fit, warps


GRID_Y = 65535  # the most programs along a CUDA grid's y


def row_tile_grid(tiles_c: int, tiles_r: int) -> tuple[tuple[int, int], bool]:
    """(grid, rows_x) of a launch whose programs find their tile from two grid coordinates, no division
    (triton_elements.grid_tile): a row's tiles along x unless the row tiles pass the grid's GRID_Y along y."""
    rows_x = tiles_r > GRID_Y
    return ((tiles_r, tiles_c) if rows_x else (tiles_c, tiles_r)), rows_x


def as_grid(t: torch.Tensor, nbr: int, nbc: int) -> torch.Tensor:
    """A scale tensor as its (NBR, NBC) block grid (a view for both layouts)."""
    return t.reshape(nbr, nbc) if t.dim() != 2 else t


def bf16_bits(x: torch.Tensor) -> bool:
    """Whether a bf16 tensor is handed to the kernels as int16 bits (the interpreter's bf16 casts are wrong)."""
    return interpreting() and x.dtype == torch.bfloat16


def input_view(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if bf16_bits(x) else x


def pair_words(v: torch.Tensor) -> torch.Tensor | None:
    """`v` (1, R, C) as (R, C / 2) words of two elements each (int32 for 16-bit, int64 for fp32 elements), where
    its layout allows (one plane, unit column stride, even C, row stride and alignment); else None. The NVFP4 and
    MXFP4 pairs kernels read their inputs so."""
    P, R, C = v.shape
    size = v.element_size()
    if not (P == 1 and v.stride(2) == 1 and C % 2 == 0 and v.stride(1) % 2 == 0 and v.data_ptr() % (2 * size) == 0
            and R > 0):
        return None
    word = torch.int32 if size == 2 else torch.int64
    flat = v.view(torch.int16 if size == 2 else torch.int32)
    return torch.as_strided(flat, (R, C), (v.stride(1), 1), flat.storage_offset()).view(word)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """One-byte tensors (fp8, E8M0, int8) as uint8 views; the kernels write raw bits."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t
