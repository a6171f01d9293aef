"""Kernel choices of the Triton backend, as one frozen object passed down from the dispatcher.

DEFAULT is what ships (each value measured on an H100 or H200 with benchmarks/quantize.py --sweep and
benchmarks/gemm.py, BENCHMARKS.md); benchmarks and tests try others with dataclasses.replace(DEFAULT, ...).
None of these choices changes a result: every setting gives the reference's bits.
"""
from __future__ import annotations

import dataclasses
import types


@dataclasses.dataclass(frozen=True)
class OneBlock:
    """How programs of one block a tile run (128 x 128 tiles, channels, long flat blocks)."""
    defer: bool  # no code for careful tiles (Inf/NaN, extreme scales): listed for a second launch (FIXUP)
    per_sm: int  # persistent programs an SM (0: one tile a program)
    tile_elems: int  # elements a thread of a 2-D block
    row_elems: int  # elements a thread of a block of one row
    maxnreg: int | None  # register limit a thread of a 2-D block (None: as ptxas chooses)
    row_maxnreg: int | None = None  # register limit a thread of a block of one row


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    # Elements one quantize program covers (bytes in flight per program) and its warps (None: by size).
    tile_elems: int = 8192
    tile_warps: int | None = None
    # Registers a thread of the quantize programs may use (None: as ptxas chooses).
    tile_maxnreg: int | None = None
    # (elements, warps) of a quantize program of row groups held in registers (1x128, 1x32; not INT8 asym), or None
    # for tile_elems and warps by size. One warp: the tile's Inf/NaN check needs no barrier. On an H200
    # (2026-12-04, 16384^2 bf16, ncu kernel time) E4M3 1x128 193 us against 202 us for 8192 at 4 warps, INT8 sym
    # 217 against 226, MXFP8 184 either way; 1024 at 1 warp 192 / 226, 2048 or 4096 at 2 warps 196 / 219-235.
    group_tile: tuple | None = (2048, 1)
    # (elements, warps) of a quantize program whose blocks' scales are looked up (statistics or given: per tensor,
    # static and delayed scales, groups too large for registers), or None for tile_elems and warps by size (8192
    # at 8 warps, 32 elements a thread). Compiled for sm_90 by triton 3.6 (benchmarks/sass.py --common-path, E4M3
    # per tensor, 16384^2 bf16) the second pass / delayed scaling take 18.8 / 22.5 SASS instructions an element
    # at 32 elements a thread, 14.9 / 18.2 at 64 (8192 at 4 warps, 96 / 127 registers), 9.5 / 13.0 at 128 (16384 at
    # 4 warps, 105 / 168 registers): a thread's fixed work spread over more elements. lookup_tile_amax: the same for
    # programs that also report the input's amax (delayed scaling), whose reduction holds more registers. H200
    # (2026-12-05, 16384^2 bf16, profile_kernels --time, one process; None / (8192, 4) / (16384, 4) / (16384, 8)):
    # per tensor (two passes) 0.520 / 0.524 / 0.570 / 0.504 x copy, given scale 0.906 / 0.887 / 1.002 / 0.867,
    # delayed scaling 0.758 / 0.806 / 0.718 / 0.758. With its amax as one max an element (triton_elements.finite_amax:
    # 15.75 SASS instructions an element at (8192, 4), 10.1 at (16384, 4) within 156 registers), on an H100
    # (2026-12-05 16:2x UTC): (8192, 4) 0.985, (16384, 4) 0.963, (8192, 2) 0.966, (16384, 8) 0.956. One warp, no
    # barrier in the amax's reduction (2026-12-06, profile_kernels --time, one process each, delayed scaling, x copy):
    # H100 (8192, 4) / (2048, 1) / (1024, 1) 16384^2 0.991-0.992 / 0.999-1.000 / 0.985, 8192^2 0.902 / 0.916 / 0.885;
    # the same H100 on 96 SMs (--sms 96, which ranked the dual plans and the NVFP4 launches as the H200 did) 0.889-0.892
    # / 0.905-0.908 / 0.925-0.927, on 88 0.870 / 0.881 / 0.907: (2048, 1) gains on either, (1024, 1) only with
    # fewer SMs (to be timed on an H200; a second H100 session agreed: 96 SMs 0.907-0.908 against 0.927, 88 SMs
    # 0.879 against 0.906, all 132 0.998-0.999 against 0.988; a third: 96 SMs 0.905-0.906 against 0.925, and (2048, 1)
    # within 96 / 80 registers (tile_maxnreg) 0.825 / 0.619).
    lookup_tile: tuple | None = (16384, 4)
    lookup_tile_amax: tuple | None = (2048, 1)
    # Delayed scaling of bf16 rows read as int32 words (triton_delayed_words: codes two a cvt, the amax by max.u16x2,
    # the elements held as words until coded, no select an element where the tile's amax shows none needed):
    # (rows, words a row, warps) of a program, or None for the programs above (lookup_tile_amax). Offline (triton
    # 3.6, sm_90, benchmarks/sass.py, E4M3 per tensor; SASS instructions an element on the common path, registers of
    # the whole kernel): (1, 512, 1) 11.8 / 63, (1, 1024, 1) 8.8 / 80, (1, 1024, 2) 12.5 / 46, against 19.2 / 127
    # for the programs above at (2048, 1). H100 (2026-12-07, driver 580.159.04, torch 2.11, triton 3.6, 16384^2 bf16,
    # profile_kernels --time --plain tensor_delayed, one process, x copy): on 96 SMs (the H200's bandwidth an SM)
    # None 0.905 / 0.905, (1, 512, 1) 0.993, (1, 1024, 1) 1.003 / 1.002, (1, 1024, 2) 1.000; on all 132 None 1.000 /
    # 0.999, (1, 1024, 1) 0.995 / 0.996, (1, 512, 1) 0.988, and 8192^2 0.914 / 0.914 against 0.918 / 0.921.
    delayed_words: tuple | None = (1, 1024, 1)
    # Programs the statistics pass aims at where it can loop (about eight an SM of the largest GPUs), the elements
    # of the tile each reads at a time, and its warps. On an H200 (2026-12-04 sweep, 16384^2 bf16 per tensor) 1024
    # programs read at 0.86-0.88 x copy against 0.79-0.81 for 2048 and 0.87 for 512; tiles of 8192 or 16384
    # elements, at 4 or 8 warps, 0.52-0.78; the next tiles' loads in flight (cp.async, 2-4 stages) 0.80-0.89.
    stats_programs: int = 1024
    stats_tile_elems: int = 4096
    stats_warps: int = 4
    # Persistent quantize programs: where a program's registers wait on a reduction over the whole tile
    # (one large block a program: 128 x 128 tiles, channels) or its encoding is long (INT8 asym), each
    # program may loop over tiles with the loads of the next persistent_stages - 1 tiles in flight
    # (cp.async), OneBlock.per_sm / asym_programs / dual_programs an SM (0: one tile a program).
    persistent_stages: int = 3
    dual_programs: int = 0
    # Warps of a dual-layout program of up to 16384 elements (a 128 x 128 tile), and its register limit: 8 warps
    # within 128 registers (two programs an SM) ran 0.56 x copy against 0.43 without the limit on an H100; since
    # the corrected quotient needs fewer registers, 4 warps without a limit run 0.540 against 0.497 (H200 sweep,
    # 2026-12-03 12:43 UTC).
    dual_warps: int = 4
    dual_maxnreg: int | None = None
    # INT8 asym programs of row groups in registers: (elements, warps) of a tile (as group_tile), its register limit,
    # persistent programs an SM (asym_programs, 0: one tile a program), and careful tiles (an Inf or NaN, extreme
    # scales) listed for a second launch (asym_defer, as OneBlock.defer) so that the first holds no code for them.
    # On an H200 (2026-12-04, 16384^2 bf16, profile_kernels --time, one process) 2048 elements at 1 warp, one tile a
    # program, no limit, deferred: 0.873 x copy, against 0.708 for the H100's choice (8 warps of 8192 elements within
    # 128 registers, two persistent programs an SM) deferred and 0.688 not. Compiled by triton 3.6 the careful branch
    # takes a 1-warp program from 118 to 167 registers (benchmarks/sass.py). H200, 2026-12-05, one process: (2048, 1)
    # 0.876, (4096, 2) 0.875, (1024, 1) 0.845, (2048, 2) 0.818, four persistent programs an SM 0.503.
    asym_tile: tuple = (2048, 1)
    asym_maxnreg: int | None = None
    asym_programs: int = 0
    asym_defer: bool = True
    # (elements, warps) of an INT8 asym program of bf16 row groups read as int32 pairs (triton_asym_pairs: lo and hi
    # reduced by bf16x2 min / max, two codes a 16-bit store), or None for the register tiles above; and the words of
    # a piece (asym_pairs_piece: 8, 32 bytes), a block's pieces held by two threads. Offline (triton 3.6, sm_90,
    # sass.py --common-path, 1x128) 11.6 SASS instructions an element at 64 registers against 16.2 at 96 for the
    # register tiles (the same kernel with a block spread over eight threads, four blocks a thread: 14.8). H200
    # (2026-12-05, 16384^2 bf16, profile_kernels --time, one process): (2048, 1) 0.921 x copy against 0.874 for the
    # register tiles, (1024, 1) 0.904, (4096, 2) 0.585; a second process 0.926 against 0.867 (6cf2eae). An earlier
    # pairs kernel with a block's words spread over its threads lost there (0.854 against 0.876, removed in 77bf878).
    # Pieces of 16 words (H200, 2026-12-05, as above): 1.004 against 0.918 for 8 and 0.635 for 4 (offline, triton
    # 3.6: the same words a thread, 96 registers against 64, 19.6 against 18.8 SASS instructions an element); on an
    # H100 32 and 64 ran as 16 (1.002, 1.002 against 0.997).
    asym_pairs_launch: tuple | None = (2048, 1)
    asym_pairs_piece: int = 16
    # INT8 asym 2-D tiles of bf16 pairs (128 x 128 and others) on the pairs kernel too, a tile row a program, this many
    # elements a thread (64: eight warps for a 128 x 128 tile), or None: on the register tiles. H100 (2026-12-05,
    # 16384^2, profile_kernels --time, one process): 64 0.995 x copy, 32 0.993, 128 0.991 against 0.977 for the
    # register tiles (0.870-0.873 on an H200, one_block_divide above). Offline (triton 3.6, sass.py, 128 x 128): 12.9
    # SASS instructions an element on the common path at 48 registers (64 with the careful path, whose blocks go in
    # chunks of 8 rows) against 13.6 at 168 for the register tiles.
    asym_pairs_tile_elems: int | None = 64
    # Careful tiles of dual-layout programs listed for a second launch, as asym_defer (triton 3.6: 128 x 128 tiles at 8
    # warps take 124 registers instead of 161). H200, as above, two runs: 0.550 / 0.549 x copy at 4 warps against
    # 0.540 / 0.538 in place; 0.523 at 8 warps, 0.394 at 8 warps within 128 registers.
    dual_defer: bool = True
    # Slabs a dual-layout program takes its tile in (its rows, then its columns, 1 / dual_slabs of the tile at a
    # time: triton_quantize._dual_tile), so that a thread holds fewer elements at once: fewer registers, more
    # programs an SM; dual_slabs_mx_asym for MX formats and INT8 asym. Each slab's load is issued before the previous
    # slab's stores (dual_prefetch; loads may not pass stores, which could alias the input as far as the compiler
    # knows), so that a program does not wait for memory at every slab. H200 (2026-12-05, 16384^2 bf16,
    # profile_kernels --time, one process; 4 slabs / 4 prefetched / 2 prefetched): E4M3 1x128 0.560 / 0.585 / 0.534
    # x copy (a second process 0.560 / 0.588), MXFP8 0.366 / 0.370 / 0.414, INT8 asym 0.386 / 0.386 / 0.396;
    # earlier (E4M3, not prefetched) 2 slabs 0.498, the whole tile 0.455 (offline, triton 3.6: 96 / 121 registers
    # for 4 slabs / 4 prefetched).
    # With dual_column_lanes (2, 8) and dual_late_check, 4 slabs for MX and INT8 asym too (H100, below: MXFP8 0.660 ->
    # 0.719, INT8 asym 0.650 -> 0.698 x copy).
    dual_slabs: int = 4
    dual_slabs_mx_asym: int = 4
    dual_prefetch: bool = True
    # The same for MX formats: with dual_column_lanes_mx (2, 4) and dual_row_words, MXFP8 without the prefetch
    # (H200, 2026-12-06, below: 0.616 -> 0.640 x copy; E4M3 with it 0.728, without 0.685; INT8 asym 0.594 / 0.538).
    dual_prefetch_mx: bool = False
    # The columns' slabs of a dual-layout program loaded as (columns side by side in a thread, rows across a warp's
    # lanes), the warps on further columns (triton_quantize._dual_load LANES), so that a column's amax is reduced in
    # registers and by shuffles and its codes are stored from the registers they were loaded in; None: the layout
    # Triton picks from the loads' contiguity (threads along the columns, warps along the rows: shared memory for the
    # column reductions and for the codes' store). Offline (triton 3.6, sm_90, 16384^2 bf16, common path, SASS an
    # element / LDS / STS / barriers / shuffles a thread): E4M3 None 31.8 / 177 / 125 / 53 / 129, (8, 32) 30.4 / 17 /
    # 53 / 33 / 185, (4, 16) 25.5 / 17 / 33 / 33 / 89, (2, 8) 23.9 / 17 / 25 / 33 / 49; MXFP8 None 30.3 / 55 / 91 /
    # 39 / 45, (2, 8) 30.6 / 17 / 25 / 29 / 61; INT8 asym None 38.1 / 91 / 225 / 53 / 133, (2, 8) 32.8 / 21 / 33 / 37
    # / 101. Narrower columns take more, smaller loads from L2 (the slab's second read): (2, 8) 80 LDG a thread
    # against 32. With (2, 8) more slabs cost less: INT8 asym in 4 slabs 32.8 an element within 144 registers against
    # 38.1 within 236 for today's 2 slabs without it. The columns' scales are then stored from the lanes of the tile's
    # first row in the load's layout (E4M3 (2, 8): 25 barriers and 13 LDS a thread against 33 and 17 through a
    # conversion; with dual_late_check 13 and 7). H100 (2026-12-05, driver 580.159.04, torch 2.11, triton 3.6,
    # profile_kernels --time --n 16384, one process; E4M3 1x128 / MXFP8 / INT8 asym x copy, the dual layout bound by
    # the SMs there too): None 0.752 / 0.581 / 0.541, (8, 32) 0.756 / 0.342 / 0.464, (4, 16) 0.735 / 0.404 / 0.487,
    # (2, 8) 0.788 / 0.619 / 0.623, with dual_late_check 0.792 / 0.660 / 0.650, and 4 slabs for MX and INT8 asym
    # 0.789 / 0.719 / 0.698; dual_late_check alone 0.710 / 0.596 / 0.555. Around that plan (H100, 18:27 and 18:33
    # UTC, two processes): no prefetch 0.726 / 0.678 / 0.662, 8 warps 0.748 / 0.627 / 0.557, 8 warps in 2 slabs for
    # every format 0.801 / 0.713 / 0.711 (in 2 slabs for E4M3 only 0.798 / 0.632 / 0.557), 2 slabs 0.730 / 0.661 /
    # 0.645, within 96 registers 0.679 / 0.713 / 0.500, persistent programs (dual_programs 4, 5) 0.29-0.46. ncu of
    # E4M3 (H100): 124 registers, 4 programs an SM (25 % occupancy), 0.39 instructions issued a cycle a scheduler,
    # half the stalls on global loads (long scoreboard), DRAM 72 %, L2 79 %: bound by the loads in flight, which only
    # shared memory filled asynchronously (TMA) would raise. Column loads that fill whole 32-byte sectors lose (H100
    # on 96 SMs, 2026-12-06, one process): (2, 4) 0.701-0.707, (4, 8) 0.562, (8, 16) 0.350 against (2, 8) 0.790-0.793.
    # Tiles copied into shared memory by TMA instead (benchmarks/dual_tma_trial.py, 128 x 128 tiles, both reductions
    # from the one copy; H100, 2026-12-07, one process): 0.295-0.436 x copy (96 SMs 0.219-0.325) against 0.796 (0.792).
    dual_column_lanes: tuple | None = (2, 8)
    # The same for MX formats (1 x 32 groups: 32-row tiles, so (2, 8) leaves a thread 4 rows of a column and the
    # column's scale is worked out by 8 lanes). Offline (triton 3.6, sm_90, MXFP8 16384^2, all paths; SASS an element /
    # registers): (2, 8) 32.4 / 96, (2, 4) 26.4 / 96, (2, 2) 27.2 / 80; with dual_row_words 29.9 / 96, (2, 4) 23.6 /
    # 114, without dual_prefetch 23.5 / 64. H200 (2026-12-06, driver 580.159.04, torch 2.11, triton 3.6,
    # profile_kernels --time --n 16384 --plain, one process; MXFP8 x copy): (2, 8) 0.577 (0.572 a second time), with
    # dual_row_words 0.549, (2, 4) with dual_row_words 0.616, and without the prefetch (dual_prefetch_mx) 0.640. The
    # H100 prefers the earlier plan ((2, 8), prefetched, no row words): 0.719 / 0.716 against 0.687 (2026-12-06 05:4x
    # UTC, one process); the H200 decides.
    dual_column_lanes_mx: tuple | None = (2, 4)
    # With dual_defer: every slab of a dual tile coded as if careless, the tile's careful blocks counted once at its
    # end (the FIXUP launch rewrites a careful tile's codes and scales), instead of a reduction over the program
    # before each slab's stores (two barriers a slab). Offline (as above, barriers / LDS / STS a thread): E4M3 53 / 177
    # / 125 -> 41 / 171 / 116, with dual_column_lanes (2, 8) 33 / 17 / 25 -> 21 / 11 / 13; INT8 asym with (2, 8) 37 ->
    # 27 barriers. Timed with dual_column_lanes, above.
    dual_late_check: bool = True
    # Every line of a dual tile asked of L2 (prefetch.global.L2, no register held) before its first slab is loaded, so
    # that its loads wait on L2 rather than on memory (the kernel is bound by the loads it has in flight, above).
    # H200 (2026-12-06, as above, before dual_row_words; E4M3 1x128 / MXFP8 / INT8 asym x copy): 0.696 / 0.577 /
    # 0.597 without, 0.717 / 0.577 / 0.589 with, 0.671 / 0.567 / 0.538 with and no register prefetch. True / False:
    # every format / none; a tuple: the formats (Format values) that prefetch. H100 on 96 and 88 of its SMs (the
    # stand-in for an H200's rankings, benchmarks/profile_kernels.py --sms; 2026-12-06, 16384^2 bf16, one process,
    # off / on / off / on): E4M3 0.780 / 0.799 / 0.779 / 0.796 and 0.776 / 0.792 / 0.768 / 0.788, MXFP8 0.696 / 0.699
    # / 0.699 / 0.709 and 0.688 / 0.690 / 0.689 / 0.697, INT8 asym 0.653 / 0.642 / 0.650 / 0.643 and 0.629 / 0.620 /
    # 0.627 / 0.619; on all 132 SMs E4M3 0.800 / 0.796 / 0.796 / 0.800, MXFP8 0.687 / 0.673 / 0.688 / 0.675, INT8
    # asym 0.709 / 0.696 / 0.704 / 0.702. So fp8 only. Asking L2 for the tile 132 or 4 x 132 tiles ahead of a
    # program's own instead (programs start about in tile order): E4M3 0.783 / 0.637 on 96 SMs, not kept.
    dual_l2_prefetch: bool | tuple = ("fp8_e4m3", "fp8_e5m2")
    # X^T's fp8 codes of a dual tile converted and stored four rows to a 32-bit word (triton_quantize._store_dual_words)
    # where its row count is a multiple of 4, instead of the cast of the whole slab. H200 (as above; E4M3 1x128 x
    # copy): 0.696 / 0.701 without, 0.728 with (offline 23.2 -> 21.0 SASS an element); with dual_l2_prefetch and
    # no register prefetch 0.685; H100 (2026-12-06, as above) 0.797 / 0.796 either way. Integer codes keep the bytes'
    # path (offline INT8 words took more instructions).
    dual_row_words: bool = True
    # Careful tiles deferred, one tile a program. Float tiles: 4 warps of 128 elements a thread of a 128 x 128
    # tile, no register limit (H200, 2026-12-04, 16384^2 bf16, ncu kernel time: E4M3 128x128 184 us against 210 us
    # for 8 warps within 128 registers, 246 us for 4 warps within 128, 240 us for 2 warps); rows within 80
    # registers, three 8-warp programs an SM (ptxas takes 87 without a limit, two an SM; H200, 2026-12-04,
    # 16384^2 bf16, profile_kernels --time, one process: E4M3 per channel 0.985 x copy against 0.934 within 128,
    # 0.981 within 72, 0.933 within 96, 0.916 without a limit, 0.919 at 32 elements a thread within 64). INT8 took
    # persistent programs at 16 elements a thread of a row block on an H100; on an H200 (2026-12-03 sweep) the float
    # schedule is faster for it too: 128x128 sym 0.730 against 0.709 x copy, asym 0.800 against 0.606, per channel 0.777
    # against 0.725. Since INT8 sym tiles that are not careful only round their quotients (no clamp, no NaN select),
    # int8 takes the float tiles without any register limit (H200, 2026-12-04, 16384^2 bf16, profile_kernels
    # --time, one process): 128x128 sym 0.986 against 0.874 at 64 elements a thread within 128 registers, per
    # channel 0.984 against 0.907 with rows of 64 within 128, asym 128x128 0.851 against 0.846. INT8 rows take 93
    # registers without a limit since the block scales' corrected steps (triton 3.6) and run as fast as within 80
    # (H200, 2026-12-05, as above: INT8 sym per channel 0.991 against 0.984).
    one_block_float: OneBlock = OneBlock(defer=True, per_sm=0, tile_elems=128, row_elems=64, maxnreg=None,
                                         row_maxnreg=80)
    one_block_int: OneBlock = OneBlock(defer=True, per_sm=0, tile_elems=128, row_elems=64, maxnreg=None,
                                       row_maxnreg=None)
    # One-block register tiles (128 x 128) find their scale by IEEE division rather than by the corrected steps
    # (the same value; one division a tile). Offline (triton 3.6) the corrected steps move the tile's scale and much
    # of its addressing to the uniform datapath (E4M3: 142 U*, RUR and VOTEU instructions against 14 with the
    # division). H200 (2026-12-05, 16384^2 bf16, profile_kernels --time, two processes, division / corrected
    # steps): E4M3 128x128 0.987 / 0.940 and 0.987 / 0.932 x copy, INT8 sym 0.985 / 0.943 and 0.987 / 0.939, INT8
    # asym 0.870 / 0.859 and 0.873 / 0.872.
    one_block_divide: bool = True
    # Blocks whose scales come from the statistics pass or are given (per tensor, channels, groups and tiles
    # too large for registers, static and delayed scales): x / scale by the guarded corrected quotient
    # (triton_elements.quotient GUARDED: a reciprocal and two fmas) instead of IEEE division wherever the
    # tile's scales are in range. On an H200 (2026-12-04, 16384^2 bf16, scales on the host): per tensor 0.523 x copy
    # against 0.509 by division, delayed scaling (one read + amax) 0.733 against 0.557.
    guarded_quotient: bool = True
    # Programs an SM of the launch that quantizes the deferred careful tiles.
    fixup_programs: int = 2
    # Elements a dequantize program covers (of byte codes; of E2M1 codes, two a byte), and the sub-tiles one-block
    # tiles (a power-of-two number of rows: 128 x 128 tiles) are dequantized in: 1 / dequant_split of a block's rows,
    # as many blocks side by side as fit (1: a block a program). Rows of 128 x 128 blocks one at a time: on an H200,
    # 128x128 0.969 x copy against 0.959 a block a program. 2048 elements of byte codes (H200, 2026-12-04, 16384^2
    # into bf16, profile_kernels --time, one process): E4M3 1x128 0.977-0.982 against 0.962-0.972 at 4096 and 0.942
    # at 8192, 128x128 0.973-0.981 / 0.964-0.968, MXFP8 0.974-0.980 / 0.963-0.965, INT8 sym 0.975-0.983 / 0.966-0.973,
    # asym 0.975-0.983 / 0.961-0.965; 1024: 0.88-0.93. E2M1 codes: (elements, warps) of a program, within 0.92-0.96
    # for every choice tried (run-to-run spread about 0.01); 2048 at 2 warps: NVFP4 0.943-0.951, MXFP4 0.949-0.960,
    # against 0.934-0.940 / 0.938-0.945 at 4096 and 4 warps, 0.946 / 0.950 at 2048 and 1 warp, 0.930 / 0.954 at 1024
    # and 1 warp, 0.890 / 0.955 at 4096 and 8 warps. Blocks of one row longer than a program (channels along the
    # rows) are dequantized in strips of dequant_tile_elems, each element's row scale looked up (False: one row a
    # program): INT8 sym per channel 0.977 x copy against 0.949 (H200, 2026-12-04, 16384^2, one process).
    dequant_tile_elems: int = 2048
    dequant_fp4_tile: tuple = (2048, 2)
    dequant_split: int = 128
    dequant_row_strips: bool = True
    # An NVFP4 quantize program: (rows, 1x16 blocks a row, warps), and its register limit a thread (None: as ptxas
    # chooses). One warp a program: its tile-wide reductions (the Inf/NaN check, the scales' layout) need no
    # barrier, and 64 registers let 32 of them share an SM. On an H200 (2026-12-04, 16384^2 bf16, given tensor
    # scale, ncu kernel time) 1 x 64 blocks at 1 warp within 64 registers took 218 us, 2 x 32 233 us, 16 x 16 at
    # 4 warps 349 us; persistent programs loading their next tile first 246-430 us. After the corrected block ratios
    # (2026-12-05, profile_kernels --time, given tensor scale, x copy): (1, 64, 1) 0.781, (1, 128, 2) 0.783, (1, 128,
    # 1) without a register limit 0.639; with the scales' stride unspecialized (05:4x UTC, one process) (1, 64, 1)
    # 0.806, (2, 64, 2) 0.773, (1, 32, 1) 0.515; 15:58 UTC: (1, 64, 1) 0.802, (1, 128, 2) 0.787, (2, 64, 2) 0.768,
    # (2, 32, 1) 0.771 (ncu: 32 one-warp programs an SM, the block limit; issue and DRAM both near 70 %). H100, code
    # bytes four words an instance (16:15 UTC): (1, 64, 1) 1.004, (1, 64, 2) 0.941, (2, 64, 4) 0.934, (1, 64, 1)
    # within 56 registers 0.927. Persistent programs of these tiles copied into shared memory by TMA while the one
    # before is coded (H100, 2026-12-07, given tensor scale against the one-tile launch's 1.004): 16 programs an SM
    # at 4 stages 0.924, 8 at 4 0.957, (2, 32, 1) tiles 16 at 3 0.935; on 96 SMs 0.744-0.822 against 0.891-0.896.
    nvfp4_launch: tuple = (1, 64, 1)
    nvfp4_maxnreg: int | None = 64
    # An MXFP4 program of 16-bit words (triton_mxfp4_pairs): (rows, MX blocks a row, warps). One or two warps
    # (H200, as above): 1 x 64 blocks at 2 warps 185 us, 2 x 32 at 1 warp 186-188 us, 16 x 16 at 4 warps 203 us.
    # With the tile from two grid coordinates (2026-12-05, profile_kernels --time, x copy, one process): (1, 64, 2)
    # 0.925, (1, 128, 4) 0.913, (1, 32, 1) 0.899, (2, 64, 4) 0.864; a block over two threads (8 words each, one
    # shuffle a reduction) 0.871, over four 0.750. Codes by three bf16x2 roundings (triton_mxfp4_pairs._e2m1_bf16_pairs:
    # 9.0 against 11.0 SASS instructions an element, triton 3.6): on an H100 (memory-bound) 1.006 against 1.004.
    mxfp4_pairs_launch: tuple = (1, 64, 2)
    # NVFP4 quantize of bf16 words (launch.inline_ptx): tiles without Inf or NaN encoded two elements at a time in PTX
    # (triton_nvfp4._e2m1_words; False: through fp32 and e2m1 for every tile, for timing against it): at 2 x 32
    # blocks, 1 warp, 64 registers 233 against 351 us (H200, as above).
    packed_encode: bool = True
    # GEMMs: the Gluon kernel where it applies (triton_gemm._gluon_applies); MXFP4 codes decoded in
    # bf16x2 PTX (triton_elements.e2m1x2_scaled; False: through fp32), by the GEMM's tiles and by dequantize into
    # bf16; dequantize decodes NVFP4 into bf16 and fp16, and MXFP4 into fp16, a code byte at a time too
    # (e2m1x2_times: fp32 products, one cvt to the half pair). On an H200 (2026-12-04, 16384^2 into bf16,
    # profile_kernels --time) NVFP4 0.942 x copy against 0.658 through fp32, MXFP4 0.949 against 0.713.
    use_gluon: bool = True
    packed_decode: bool = True
    # The Triton GEMMs' launch configs, autotuned per shape (None: triton_gemm.SCALED_CONFIGS / MX_CONFIGS;
    # the interpreter always runs its one small config), and persistent programs (False: one output tile a
    # program, for timing against the persistent launch).
    scaled_gemm_configs: tuple | None = None
    mx_gemm_configs: tuple | None = None
    gemm_persistent: bool = True
    # FP8 GEMMs of at most gemm_decode_m rows (decode shapes: M rows against a large weight, whose few output tiles
    # leave most SMs idle) through the Triton kernel with their K blocks split over programs (at most
    # gemm_max_split a tile), the fp32 partials added in order by a second launch (triton_gemm._split_k); 0: never.
    # On an H200 (2026-12-04, N = K = 8192, benchmarks/gemm.py --decode, TFLOPS) M = 8 / 32 / 64: 41.3 / 179 / 357,
    # 1.15 / 1.07 / 1.09 x cuBLAS blockwise, against the Gluon kernel's 27.4 / 121 / 256 (0.76 / 0.73 / 0.78); M = 1
    # 5.65 against 3.32 (cuBLAS bf16 4.0); at M = 128 the tiles fill the SMs and nothing is split (0.81, as Gluon's).
    gemm_decode_m: int = 64
    gemm_max_split: int = 8
    # FP8 GEMMs on the Gluon kernel (more rows than gemm_decode_m) whose 128 x 128 tiles fill at most half the SMs
    # (M = 65..256 against a weight of N <= 8192 on a 132-SM GPU) with each tile's K blocks split over work items
    # (at most gemm_max_split, whole pairs), the partials added in order (gluon_gemm, SPLIT). H200 (2026-12-05, N = K
    # = 8192, gemm.py --decode, TFLOPS): M = 128 569 against 508 unsplit, 0.93 against 0.83 x cuBLAS blockwise
    # (GPU tests `-m gpu tests/test_triton_gemm.py -k gluon_split` passed 2026-12-05).
    gemm_gluon_split: bool = True
    # FP8 GEMMs of scales constant along K (per tensor, per row) on the Gluon kernel, unsplit: three consumer
    # warpgroups (192-row tiles) where their last wave of tiles is at least as full and K at most 8192
    # (gluon_gemm.row_scaled_variant); False: always two (128-row tiles). H200 (2026-12-05, gluon_gemm_check.py, bf16
    # out, per tensor): 8192^3 1215 against 1163 TFLOPS (cuBLAS 1233), 4096^3 1077 against 1137 (cuBLAS 1135), where
    # two are kept; H100: 8192^3 1144 against 1125 (cuBLAS 1211), 16384^3 1043 against 1163 (cuBLAS 1212).
    gemm_gluon_wide_rows: bool = True
    # INT8 GEMMs of at most gemm_decode_m rows split K as FP8 ones do, their int32 partials added exactly before the
    # scales (the unsplit product's bits). H200, as above: M = 32 / 64 187 / 368 against 145 / 285 unsplit (0.96 /
    # 0.99 against 0.75 / 0.77 x torch._int_mm), M = 8 49 against 37 (GPU tests `-k int8_split` passed 2026-12-05).
    gemm_split_int8: bool = True


DEFAULT = KernelConfig()

# The dual plan shipped before 2026-12-06 and still the faster one on an H100 (MXFP8 dual 0.719 against 0.687 x copy;
# E4M3 and INT8 asym alike, dual_row_words' comment): for dataclasses.replace(DEFAULT, **DUAL_PLAN_H100).
DUAL_PLAN_H100 = types.MappingProxyType(dict(dual_row_words=False, dual_column_lanes_mx=(2, 8), dual_prefetch_mx=True))
