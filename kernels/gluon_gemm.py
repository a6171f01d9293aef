"""Hopper (sm_90) FP8 GEMM in Triton's Gluon dialect: C = A @ B^T, A (M, K) and B (N, K) FP8 codes
(E4M3 or E5M2, in any pairing), in one of two modes (the constexpr SCALE_PER_K):

* block-scaled, the DeepSeek recipe (blockscaled_matmul): fp32 scales per 1 x 128 group of A,
  sa (M, K/128), and per 128 x 128 tile of B, sb (N/128, K/128). Every 128-wide K block's MMA product
  is promoted into an fp32 accumulator times sa[row, kb] * sb[col // 128, kb];
* scales constant along K (rowscaled_matmul): one scale for A or one per row of A, one for B or one
  per row of B (a column of C). Every K block's MMA product is added to the fp32 accumulator as it
  is, and after the K loop C = acc * (sa[row] * sb[col]).

Both as in triton_gemm._scaled_gemm_kernel (SCALE_PER_K True / False); what differs is the schedule,
which Gluon lets us write by hand:

* Warp specialization, three partitions in one persistent program per SM:
  - a producer (1 warp, few registers) that walks the same tiles and streams A and B blocks into a
    ring of STAGES shared-memory slots with TMA, each slot guarded by a "ready" and an "empty" mbarrier;
  - two consumer warpgroups (the default partition and one worker), each owning 64 rows of the
    128 x 128 tile and reading the same B slot, each with most of the register file.
* Inside a consumer, the MMA of K block k+1 is issued asynchronously (wgmma) into a second register
  tile before block k's product is waited for (wgmma.wait_group 1); block k's product is then scaled
  (or, without per-K scales, added) into the fp32 accumulator on the CUDA cores while block k+1 runs
  on the tensor cores. The two product tiles alternate through a chain of CHAIN blocks (static
  unroll); the last block of a chain is promoted with nothing queued behind it in this warpgroup (the
  other warpgroup's MMAs can fill the gap). Chains rather than a rolling pipeline because ptxas
  serializes every wgmma of the kernel (C7514) when an MMA issued before a loop back-edge is read by
  the CUDA cores after it. The K block count is padded to even with an all-zero block (TMA zero fill).
* The two warpgroups are not locked together: each arrives on the slot's "empty" barrier itself.

Split K (SPLIT > 1, for shapes whose 128 x 128 tiles would leave SMs idle): the programs walk work items, a
tile and one of SPLIT runs of whole pairs of its K blocks each, and write fp32 partials that a second launch
adds in order (launch.sum_splits), as triton_gemm's split-K kernel does.

Ragged M, N, K: TMA zero-fills out-of-bounds codes, scale indices are clamped, the C store is masked.
(The zero padding block adds +0 to an accumulator that is never -0: sums start at +0 and round to
nearest, so it changes nothing.) Scales are read through plain pointers with any strides.

triton_gemm.matmul runs this kernel for those recipes on sm_90 GPUs and _scaled_gemm_kernel for
everything else (and under the interpreter, which has no Gluon). Both give the same products: the
same MMA per K block, scaled and added in the same order.

Needs triton.experimental.gluon with the Hopper API of triton 3.6 (run on an H100) or later (3.9
compiles it for sm_90); `AVAILABLE` is False and `UNAVAILABLE_REASON` says why when the import fails.
"""
from __future__ import annotations

import inspect

import torch
import triton

from .launch import shared_memory, sm_count, split_run, sum_splits, tile_offsets, tma_rows
from .spec import OUT_DTYPES

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # gl.warp_specialize took (default_args, default_partition, worker_args, ...) before 3.6 and
    # keywords after it; this file is written against 3.6's [(function, args), ...] form.
    if list(inspect.signature(gl.warp_specialize).parameters)[0] != "functions_and_args":
        raise ImportError("gl.warp_specialize has a different signature from triton 3.6's")
    # TMA's global -> shared copy: async_load from triton 3.7 on (the old name raises there).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    AVAILABLE, UNAVAILABLE_REASON = True, ""
except Exception as e:  # older triton, or a Gluon without the Hopper API
    AVAILABLE, UNAVAILABLE_REASON = False, f"triton {triton.__version__}: Gluon Hopper API unavailable ({e!r})"
# Pairs of CTAs (GluonConfig.cluster 2) from triton 3.9 on: its arrive on a barrier of the pair reaches CTA 0's
# (3.7 and 3.8 arrive locally, and the pair's B slots would never be freed; benchmarks/gluon_cluster_probe.py).
CLUSTER_AVAILABLE = AVAILABLE and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
if CLUSTER_AVAILABLE:
    from triton.experimental.gluon.language.nvidia.hopper.cluster import barrier as _cluster_barrier
    _allocate_mbarrier = mbarrier.allocate_mbarrier
else:  # names the kernel's pair branch refers to (triton resolves every name of a kernel for its cache key)
    _cluster_barrier = _allocate_mbarrier = None

K_BLOCK = 128  # one MMA (and one scale group) per 128-wide K block
TILE = 128  # rows and columns of an output tile
SCALE_TILE = 128  # rows of B per scale (B's 128 x 128 tiles)
CODE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # A and B each, in any pairing


class GluonConfig:
    """A launch variant: consumer warpgroups, ring depth, K blocks per MMA chain, tile walk, register split
    between partitions.

    Tiles of 64 * warpgroups x 128 x 128, one consumer warpgroup per 64 rows. Two warpgroups (128-row tiles):
    each holds three 64 x 128 fp32 register tiles (accumulator and two MMA products, 192 registers a thread),
    K blocks in software-pipelined chains of `chain` (even; only the last block of a chain is scaled with no
    MMA queued behind it). Three (192-row tiles, a sixth less traffic per FLOP from L2 into shared memory):
    each holds the accumulator and one product tile, waits for each block's MMA and scales it while the
    other warpgroups' MMAs run (`chain` unused). maxnreg caps the whole program (two: 12 warps, 4 + 4 + 1
    padded to a warpgroup, 65536 / 384 -> 168; three: 16 warps -> 128); consumer_regs and producer_regs are
    the setmaxnreg targets of the worker partitions, and the default (consumer) partition gets what is left.
    cluster 2 (block-scaled, two warpgroups, triton 3.9 on: CLUSTER_AVAILABLE): the programs run in pairs, a
    cluster of two CTAs on 256 x 128 tiles, each CTA 64 rows of each warpgroup's 128 with the whole B block,
    which CTA 0 copies into both CTAs' ring (TMA multicast: B crosses from L2 once for the two); the pair's
    consumers release each B slot on a barrier in CTA 0 (_fp8_gemm_kernel).
    """

    def __init__(self, stages=4, chain=4, group_m=8, maxnreg=168, consumer_regs=240, producer_regs=24,
                 warpgroups=2, cluster=1):
        self.stages, self.chain, self.group_m, self.warpgroups = stages, chain, group_m, warpgroups
        self.maxnreg, self.consumer_regs, self.producer_regs = maxnreg, consumer_regs, producer_regs
        self.cluster = cluster

    def __repr__(self):
        pair = " cluster2" if self.cluster == 2 else ""
        return (f"gluon {64 * self.warpgroups}x128x128 stages{self.stages} chain{self.chain} group{self.group_m} "
                f"regs{self.consumer_regs}/{self.producer_regs}{pair}")


# The first is the default. On an H100 (BENCHMARKS.md): chains of 8 with 4 stages 1009 / 1000 TFLOPS
# at 4096^3 / 8192^3, chains of 4 999 / 992, chains of 2 984 / 957, 3 stages 888 / 899.
# On an H200 (2026-12-05, benchmarks/gluon_gemm_check.py, bf16 out, TFLOPS; cuBLAS blockwise 1072 / 1119) block-scaled
# 4096^3 / 8192^3: chains of 8 1002 / 1024, of 4 990 / 1007, of 2 988 / 972, 3 stages 915 / 902, three warpgroups 912 /
# 996. Per tensor (cuBLAS 1135 / 1233): 1137 / 1163, 1140 / 1161, 1113 / 1155, 1023 / 986, three warpgroups 1077 / 1215.
# Ring depth (H100, 2026-12-06, gluon_gemm_check.py --no-check --sizes 4096 8192, three runs; ncu: cuBLAS blockwise
# runs 6 stages of 128 x 128 x 128 in clusters of 2): block-scaled 4096^3 / 8192^3 5 stages 1027-1077 / 1008-1033
# TFLOPS against 4 stages 999-1044 / 998-1018 (6 stages, first run: 1018 / 1007); per tensor 1181-1210 / 1158-1204
# against 1135-1172 / 1139-1169. 5 stages fit beside fp32 output's staging (ring_stages), 6 only beside 16-bit's.
THREE_WARPGROUPS = GluonConfig(4, 2, maxnreg=128, consumer_regs=160, warpgroups=3)
CONFIGS = [GluonConfig(5, 8), GluonConfig(4, 8), GluonConfig(4, 2), GluonConfig(3, 4), THREE_WARPGROUPS]
# The default's launch over pairs of CTAs (B multicast); not among CONFIGS: compiled for sm_90 (tests/test_sass_tool.py,
# triton 3.9). On an H100 (triton 3.9, 2026-12-07) it gave the default's bits at 1 x 1 x 1 and 130 x 7 x 383 (fewer K
# blocks than ring slots) and hung at 257 x 383 x 1100 (9 K blocks, 6 tiles): experimental until that is found
# (BENCHMARKS.md; benchmarks/gluon_gemm_check.py --pair times it against the others and cuBLAS).
PAIR = GluonConfig(5, 8, cluster=2)
# How a block is laid out over a pair of CTAs (cga_layout bases): its rows split between the two, or whole in each.
ROWS_SPLIT, WHOLE_IN_EACH = [[1, 0]], [[0, 0]]


def operand_blocks(cfg: GluonConfig) -> tuple:
    """((rows, cga_layout) of A's TMA block, (rows, cga_layout) of B's) of cfg's launch (cga_layout None: one CTA a
    program): A a warpgroup's rows (64 a piece with three; 128 over a pair, 64 in each CTA), B a 128 x 128 tile."""
    if cfg.cluster == 2:
        return (TILE, ROWS_SPLIT), (TILE, WHOLE_IN_EACH)
    return (TILE if cfg.warpgroups == 2 else 64, None), (TILE, None)


if AVAILABLE:

    _tile_offsets = gluon.jit(tile_offsets)
    _split_run = gluon.jit(split_run)
    _GL_CODE_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5}

    @gluon.jit
    def _work_item(item, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   GROUP_M: gl.constexpr, SPLIT: gl.constexpr):
        """(first row, first column, first K block, end K block, split) of work item `item`: a tile's K blocks,
        padded to an even count (the consumers take them in pairs), shared out in SPLIT runs of whole pairs
        (trailing runs may be empty)."""
        split, k_first, k_end = _split_run(item, 2 * gl.cdiv(gl.cdiv(K, BLOCK_K), 2), SPLIT, 2)
        off_m, off_n = _tile_offsets(item // SPLIT, gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), BLOCK_M, BLOCK_N, GROUP_M)
        return off_m, off_n, k_first, k_end, split

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, b_free, M, N, K,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  GROUP_M: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr, PIECES: gl.constexpr,
                  CLUSTER: gl.constexpr):
        """TMA loads of every K block of this program's work items into the slot ring (one warp); A's block in
        PIECES pieces of a_desc's rows (slots s * PIECES .. s * PIECES + PIECES - 1 of a_bufs). CLUSTER 2: each
        CTA its rows of the pieces, B by CTA 0 into both CTAs' slot once both have freed it (b_free)."""
        items = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N) * SPLIT
        nbytes: gl.constexpr = (BLOCK_M // CLUSTER + BLOCK_N) * BLOCK_K  # one byte a code, a CTA
        c = 0
        for item in range(gl.program_id(0), items, gl.num_programs(0)):
            off_m, off_n, k_first, k_end, split = _work_item(item, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                                                             SPLIT)
            for kb in range(k_first, k_end):
                s = c % STAGES
                # A fresh mbarrier counts as having completed the phase before 0: the first lap waits for nothing.
                mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
                if CLUSTER == 2:  # a barrier of the pair, in CTA 0: waited for there only
                    mbarrier.wait(b_free.index(s), ((c // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                # Past K (the padding block) TMA writes zeros and still counts the whole box.
                for j in gl.static_range(PIECES):
                    _tma_load(a_desc, [off_m + j * (BLOCK_M // PIECES), kb * BLOCK_K], ready.index(s),
                              a_bufs.index(s * PIECES + j))
                if CLUSTER == 2:
                    _tma_load(b_desc, [off_n, kb * BLOCK_K], ready.index(s), b_bufs.index(s), multicast=True)
                else:
                    _tma_load(b_desc, [off_n, kb * BLOCK_K], ready.index(s), b_bufs.index(s))
                c += 1

    @gluon.jit
    def _issue(a_bufs, b_bufs, ready, c, free, sa_ptrs, sb_ptr, kb, k_groups, stride_sak, stride_sbk,
               WG: gl.constexpr, HALF_M: gl.constexpr, STAGES: gl.constexpr, SCALE_PER_K: gl.constexpr,
               PIECES: gl.constexpr):
        """Start the MMA of slot c's block into the register tile `free` (its old value unused) and load
        that block's scales; returns (MMA in flight, A's scales (HALF_M,), B's scale). Without
        SCALE_PER_K nothing is loaded: the scales come back as given (sa_ptrs, sb_ptr), unused."""
        s = c % STAGES
        mbarrier.wait(ready.index(s), (c // STAGES) & 1)
        if PIECES == 1:  # the slot's whole A block: this warpgroup's rows of it
            a = a_bufs.index(s).slice(WG * HALF_M, HALF_M, dim=0)
        else:  # a piece a warpgroup
            a = a_bufs.index(s * PIECES + WG)
        tok = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), free, use_acc=False, is_async=True)
        if SCALE_PER_K:
            kq = gl.minimum(kb, k_groups - 1)  # the padding block (all zeros) reads the last group's scales
            return tok, gl.load(sa_ptrs + kq * stride_sak), gl.load(sb_ptr + kq * stride_sbk)
        else:
            return tok, sa_ptrs, sb_ptr

    @gluon.jit
    def _retire(tok, acc, sa, sb, empty, b_free, c, OUTSTANDING: gl.constexpr, STAGES: gl.constexpr,
                SCALE_PER_K: gl.constexpr, CLUSTER: gl.constexpr):
        """Wait for the MMA `tok` (leaving OUTSTANDING newer ones running), free its slot (CLUSTER 2: its B on
        the pair's barrier too), and add its scaled product to the fp32 accumulator (without SCALE_PER_K: the
        product alone, sa and sb unused); returns (accumulator, the product's registers, now free)."""
        p = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=[tok])
        mbarrier.arrive(empty.index(c % STAGES), count=1)
        if CLUSTER == 2:
            mbarrier.arrive(b_free.index(c % STAGES), count=1)  # CTA 1's arrives in CTA 0
        # acc += p * scale as inline asm with side effects: LLVM must keep it before the next wgmma
        # that reuses p's registers. (A plain fma is sunk past that wgmma; p's registers then have to
        # live on while the wgmma writes them, and ptxas serializes every wgmma of the kernel.)
        if SCALE_PER_K:
            acc = gl.inline_asm_elementwise("fma.rn.f32 $0, $1, $2, $3;", "=r,r,r,r",
                                            [p, gl.expand_dims(sa, 1) * sb, acc], dtype=gl.float32,
                                            is_pure=False, pack=1)
        else:  # acc + p, the Triton kernel's addf, kept in place the same way
            acc = gl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [acc, p], dtype=gl.float32,
                                            is_pure=False, pack=1)
        return acc, p

    @gluon.jit
    def _chain(a_bufs, b_bufs, ready, empty, b_free, x, y, acc, c, kb, sa_ptrs, sb_tile, k_groups, stride_sak,
               stride_sbk, WG: gl.constexpr, HALF_M: gl.constexpr, STAGES: gl.constexpr, BLOCKS: gl.constexpr,
               SCALE_PER_K: gl.constexpr, PIECES: gl.constexpr, CLUSTER: gl.constexpr):
        """BLOCKS (even) consecutive K blocks from slot c / K block kb, alternating between the product
        tiles x and y: each block's MMA is issued before the previous block's product is waited for
        and scaled, so the tensor cores always have one queued, except while the last is scaled.

        Every MMA is retired inside the chain: ptxas serializes all wgmmas of the kernel (C7514) when
        one issued before a loop back-edge is read by the CUDA cores after it.
        """
        tx, sax, sbx = _issue(a_bufs, b_bufs, ready, c, x, sa_ptrs, sb_tile, kb, k_groups, stride_sak, stride_sbk,
                              WG, HALF_M, STAGES, SCALE_PER_K, PIECES)
        for j in gl.static_range(0, BLOCKS, 2):
            ty, say, sby = _issue(a_bufs, b_bufs, ready, c + j + 1, y, sa_ptrs, sb_tile, kb + j + 1, k_groups,
                                  stride_sak, stride_sbk, WG, HALF_M, STAGES, SCALE_PER_K, PIECES)
            acc, x = _retire(tx, acc, sax, sbx, empty, b_free, c + j, 1, STAGES, SCALE_PER_K, CLUSTER)
            if j + 2 < BLOCKS:
                tx, sax, sbx = _issue(a_bufs, b_bufs, ready, c + j + 2, x, sa_ptrs, sb_tile, kb + j + 2, k_groups,
                                      stride_sak, stride_sbk, WG, HALF_M, STAGES, SCALE_PER_K, PIECES)
                acc, y = _retire(ty, acc, say, sby, empty, b_free, c + j + 1, 1, STAGES, SCALE_PER_K, CLUSTER)
            else:
                acc, y = _retire(ty, acc, say, sby, empty, b_free, c + j + 1, 0, STAGES, SCALE_PER_K, CLUSTER)
        return acc, x, y

    @gluon.jit
    def _single(a_bufs, b_bufs, ready, empty, b_free, p, acc, c, kb, sa_ptrs, sb_tile, k_groups, stride_sak,
                stride_sbk, WG: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr, SCALE_PER_K: gl.constexpr,
                PIECES: gl.constexpr, CLUSTER: gl.constexpr):
        """One K block into the only product tile p: its MMA, waited for, then scaled into the accumulator (the
        other warpgroups' MMAs keep the tensor cores busy meanwhile); returns (accumulator, p)."""
        tok, sa, sb = _issue(a_bufs, b_bufs, ready, c, p, sa_ptrs, sb_tile, kb, k_groups, stride_sak, stride_sbk,
                             WG, ROWS, STAGES, SCALE_PER_K, PIECES)
        return _retire(tok, acc, sa, sb, empty, b_free, c, 0, STAGES, SCALE_PER_K, CLUSTER)

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K,
                  stride_cm, stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  GROUP_M: gl.constexpr, STAGES: gl.constexpr, CHAIN: gl.constexpr, SCALE_PER_K: gl.constexpr,
                  SPLIT: gl.constexpr, PIECES: gl.constexpr, CLUSTER: gl.constexpr):
        """One warpgroup: rows WG*64 .. WG*64+63 of every work item's tile, its K blocks in chains of CHAIN
        (the last pairs in chains of 2), then a masked store of its 64 x 128 piece of C (SPLIT > 1: of the
        item's fp32 partial, into plane `split` of ws_ptr, (SPLIT, M, N) contiguous). CLUSTER 2: rows
        WG*128 .. WG*128+127 of the pair's tile, 64 in each CTA (the register layouts' CTA split).

        Without SCALE_PER_K the scales are one per row of A and one per row of B (stride 0: one for
        all): read once an item, before its K loop, and applied after it as acc * (sa * sb)."""
        HALF_M: gl.constexpr = 64 * CLUSTER  # rows of a warpgroup (over the pair: 64 a CTA)
        DOUBLE: gl.constexpr = BLOCK_M == 128 * CLUSTER  # two product tiles (chains), else one
        if CLUSTER == 2:  # rows split between the pair (ROWS_SPLIT; triton 3.6 takes no constexpr list here)
            mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BLOCK_N, 32], cga_layout=[[1, 0]])
        else:
            mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BLOCK_N, 32])
        col_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])  # B's per-row scales (not SCALE_PER_K)
        items = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N) * SPLIT
        k_groups = gl.cdiv(K, BLOCK_K)
        x = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)  # the MMA product tiles
        if DOUBLE:
            y = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
        c = 0  # slot counter, in step with the producer's
        for item in range(gl.program_id(0), items, gl.num_programs(0)):
            off_m, off_n, kb, k_end, split = _work_item(item, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT)
            pairs = (k_end - kb) // 2  # the producer pads an odd block count with one zero block
            rows = off_m + WG * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, mma))
            sa_ptrs = sa_ptr + gl.minimum(rows, M - 1) * stride_sam
            if SCALE_PER_K:
                sb_tile = sb_ptr + (off_n // 128) * stride_sbn
            else:
                # Loaded ahead, their latency hidden by the K loop: A's in the rows' layout (2 registers
                # a thread), B's one a thread, moved into the columns' layout after the loop.
                sa = gl.load(sa_ptrs)
                cols = off_n + gl.arange(0, BLOCK_N, layout=col_layout)
                sb = gl.load(sb_ptr + gl.minimum(cols, N - 1) * stride_sbn)
                sb_tile = sb_ptr
            acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, mma)
            if DOUBLE:
                for i in range(pairs // (CHAIN // 2)):
                    acc, x, y = _chain(a_bufs, b_bufs, ready, empty, b_free, x, y, acc, c, kb, sa_ptrs, sb_tile,
                                       k_groups, stride_sak, stride_sbk, WG, HALF_M, STAGES, CHAIN, SCALE_PER_K,
                                       PIECES, CLUSTER)
                    c += CHAIN
                    kb += CHAIN
                for i in range(pairs % (CHAIN // 2)):
                    acc, x, y = _chain(a_bufs, b_bufs, ready, empty, b_free, x, y, acc, c, kb, sa_ptrs, sb_tile,
                                       k_groups, stride_sak, stride_sbk, WG, HALF_M, STAGES, 2, SCALE_PER_K, PIECES,
                                       CLUSTER)
                    c += 2
                    kb += 2
            else:
                for i in range(2 * pairs):
                    acc, x = _single(a_bufs, b_bufs, ready, empty, b_free, x, acc, c, kb, sa_ptrs, sb_tile,
                                     k_groups, stride_sak, stride_sbk, WG, HALF_M, STAGES, SCALE_PER_K, PIECES,
                                     CLUSTER)
                    c += 1
                    kb += 1
            if not SCALE_PER_K:  # as _scaled_gemm_kernel: acc * (sa * sb), sa per row, sb per column
                sb_cols = gl.convert_layout(sb, gl.SliceLayout(0, mma))
                acc = acc * (gl.expand_dims(sa, 1) * gl.expand_dims(sb_cols, 0))
            if SPLIT == 1:
                _store_piece(c_ptr, acc, off_m + WG * HALF_M, off_n, M, N, stride_cm, stride_cn, HALF_M, BLOCK_N,
                             CLUSTER)
            else:
                _store_piece(ws_ptr + split.to(gl.int64) * M * N, acc, off_m + WG * HALF_M, off_n, M, N, N, 1,
                             HALF_M, BLOCK_N, CLUSTER)

    @gluon.jit
    def _store_piece(ptr, acc, first_row, off_n, M, N, stride_m, stride_n, ROWS: gl.constexpr, COLS: gl.constexpr,
                     CLUSTER: gl.constexpr):
        """Masked store of a ROWS x COLS accumulator piece at (first_row, off_n) of an (M, N) matrix of ptr's
        dtype: through shared memory into rows of 16-byte pieces, for wide coalesced stores (CLUSTER 2: the
        rows split between the pair's CTAs, as the accumulator's)."""
        VEC: gl.constexpr = 128 // ptr.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
        if CLUSTER == 2:  # ROWS_SPLIT, as the accumulator's
            layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // COLS, COLS // VEC], [4, 1], [1, 0],
                                                    cga_layout=[[1, 0]])
        else:
            layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // COLS, COLS // VEC], [4, 1], [1, 0])
        out = gl.convert_layout(acc.to(ptr.dtype.element_ty), layout)
        r = gl.expand_dims(first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout)), 1)
        q = gl.expand_dims(off_n + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout)), 0)
        gl.store(ptr + r.to(gl.int64) * stride_m + q * stride_n, out, mask=(r < M) & (q < N))

    @gluon.jit
    def _fp8_gemm_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K,
                         stride_cm, stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk,
                         STAGES: gl.constexpr, GROUP_M: gl.constexpr, CHAIN: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, SCALE_PER_K: gl.constexpr,
                         SPLIT: gl.constexpr = 1, WGS: gl.constexpr = 2, CLUSTER: gl.constexpr = 1):
        """C = (A codes x B codes^T) with A's and B's scales; see the module docstring.

        SCALE_PER_K: A's 1x128 and B's 128x128 scales, applied to every K block's product. Otherwise
        scales constant along K, per row of A and of B (stride_sam / stride_sbn 0: one for all), applied
        after the K loop; stride_sak and stride_sbk are then unused.

        Persistent: program p takes work items p, p + num_programs, ...: tiles in the GROUP_M order of
        _tile_offsets, each split into SPLIT runs of its K blocks (_work_item). SPLIT > 1: each item's fp32
        partial goes to plane `split` of ws_ptr ((SPLIT, M, N), contiguous; launch.sum_splits adds them into C).
        WGS consumer warpgroups of 64 rows: 128-row tiles (a_desc's block), or 192-row ones whose A block comes
        in three 64-row pieces (a_desc's block; shapes are powers of two).
        CLUSTER 2 (num_ctas=2; block-scaled, two warpgroups, one work item a tile): a program is a pair of CTAs
        on a 256 x 128 tile, a_desc's block a warpgroup's 128 rows (64 a CTA), b_desc's shared by the pair
        (multicast from CTA 0). `empty` frees each CTA's A slot to its own producer, `b_free` (in CTA 0, both
        CTAs' consumers arriving) the pair's B slot to CTA 0's. Triton (3.9) ends the warp-specialized region of a
        cluster with a cluster barrier, so CTA 0's shared memory outlives the arrives of CTA 1 (no producer tail).
        Launched with num_warps=4 (the default partition, consumer warpgroup 0).
        """
        BLOCK_M: gl.constexpr = 64 * WGS * CLUSTER
        PIECES: gl.constexpr = BLOCK_M // a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BLOCK_N == 128, "one B scale (128 x 128 tiles) per tile column")
        gl.static_assert((WGS == 2 and PIECES == CLUSTER) or (WGS == 3 and PIECES == 3 and CLUSTER == 1),
                         "128 x 128 or 3 x 64 x 128 A blocks, or a pair's 2 x 128 x 128")
        gl.static_assert(CLUSTER == 1 or (SCALE_PER_K and SPLIT == 1), "pairs: block-scaled, unsplit")
        gl.static_assert(CHAIN % 2 == 0, "K blocks go in pairs")
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * PIECES, BLOCK_M // PIECES, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        if CLUSTER == 2:  # one barrier a CTA, and b_free one of the pair (in CTA 0: counts both CTAs' arrivals)
            ready = _allocate_mbarrier(batch=STAGES)
            empty = _allocate_mbarrier(batch=STAGES)
            b_free = _allocate_mbarrier(batch=STAGES, two_ctas=True)
        else:
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            b_free = empty  # unused
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect; TMA completes the bytes
            mbarrier.init(empty.index(i), count=WGS)  # one arrive per consumer warpgroup
            if CLUSTER == 2:
                mbarrier.init(b_free.index(i), count=WGS)  # a CTA's (the pair's barrier counts both)
        if CLUSTER == 2:
            _cluster_barrier()  # the barriers' init seen by both CTAs before any arrive or copy
        if WGS == 2:
            gl.warp_specialize([
                (_consumer, (a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K, stride_cm,
                             stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk, 0, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, STAGES, CHAIN, SCALE_PER_K, SPLIT, PIECES, CLUSTER)),
                (_consumer, (a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K, stride_cm,
                             stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk, 1, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, STAGES, CHAIN, SCALE_PER_K, SPLIT, PIECES, CLUSTER)),
                (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, b_free, M, N, K,
                             BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, SPLIT, PIECES, CLUSTER)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K, stride_cm,
                             stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk, 0, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, STAGES, CHAIN, SCALE_PER_K, SPLIT, PIECES, CLUSTER)),
                (_consumer, (a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K, stride_cm,
                             stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk, 1, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, STAGES, CHAIN, SCALE_PER_K, SPLIT, PIECES, CLUSTER)),
                (_consumer, (a_bufs, b_bufs, ready, empty, b_free, c_ptr, sa_ptr, sb_ptr, ws_ptr, M, N, K, stride_cm,
                             stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk, 2, BLOCK_M, BLOCK_N,
                             BLOCK_K, GROUP_M, STAGES, CHAIN, SCALE_PER_K, SPLIT, PIECES, CLUSTER)),
                (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, b_free, M, N, K,
                             BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, SPLIT, PIECES, CLUSTER)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


# ---- host side ----------------------------------------------------------------------------------


def _codes_descriptor(codes: torch.Tensor, k: int, rows_per_block: int, cga_layout=None):
    """A TMA descriptor over 2-D FP8 codes (block rows_per_block x 128); layouts TMA cannot read are
    copied first (launch.tma_rows). cga_layout (a pair of CTAs): ROWS_SPLIT or WHOLE_IN_EACH."""
    codes = tma_rows(codes, k)
    block = [rows_per_block, K_BLOCK]
    extra = {} if cga_layout is None else {"cga_layout": cga_layout}
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_CODE_DTYPES[codes.dtype], **extra)
    return TensorDescriptor(codes, [codes.shape[0], k], [codes.stride(0), 1], block, layout)


def _output(a_codes, b_codes, out_dtype, out):
    """Checks shared by both recipes; returns (M, N, K, C) (C: `out` or a new tensor)."""
    if not AVAILABLE:
        raise RuntimeError(f"gluon_gemm: {UNAVAILABLE_REASON}")
    (M, K), N = a_codes.shape, b_codes.shape[0]
    if a_codes.dtype not in CODE_DTYPES or b_codes.dtype not in CODE_DTYPES:
        raise TypeError(f"gluon_gemm: codes must be float8_e4m3fn or float8_e5m2, "
                        f"got {a_codes.dtype} and {b_codes.dtype}")
    if b_codes.shape[1] != K:
        raise ValueError(f"gluon_gemm: A {list(a_codes.shape)} and B {list(b_codes.shape)} differ in K")
    if out_dtype not in OUT_DTYPES.values():
        raise TypeError(f"gluon_gemm: out_dtype {out_dtype} is not supported")
    if a_codes.device.type != "cuda" or torch.cuda.get_device_capability(a_codes.device)[0] != 9:
        raise ValueError("gluon_gemm: needs CUDA tensors on an sm_90 (Hopper) GPU")
    c = torch.empty((M, N), dtype=out_dtype, device=a_codes.device) if out is None else out
    if tuple(c.shape) != (M, N) or c.dtype != out_dtype:
        raise ValueError(f"gluon_gemm: out is {c.dtype} {list(c.shape)}, expected {out_dtype} {[M, N]}")
    return M, N, K, c


def ring_stages(cfg: GluonConfig, out_size: int, shared_limit: int) -> int:
    """cfg.stages, or fewer where the ring (a 64 * warpgroups x 128 slot of A and a 128 x 128 slot of B, FP8, a
    stage) and the epilogue's staging of the output tile (out_size bytes an element) would not fit in shared_limit
    bytes (three warpgroups with fp32 output: 4 stages need 262,220 bytes of an H200's 232,448)."""
    rows = 64 * cfg.warpgroups
    stage, epilogue = (rows + TILE) * K_BLOCK, rows * TILE * out_size
    fit = (shared_limit - epilogue - 1024) // stage  # 1 KB: the mbarriers and alignment
    if fit < 2:
        raise ValueError(f"gluon_gemm: {cfg} needs more than {shared_limit} bytes of shared memory")
    return min(cfg.stages, fit)


def _last_wave(cfg: GluonConfig, M: int, N: int, programs: int) -> float:
    """How full a persistent launch of cfg's tiles over an (M, N) output keeps its programs: tiles / (waves *
    programs), 1.0 where every program walks as many tiles."""
    tiles = -(-M // (64 * cfg.warpgroups)) * -(-N // TILE)
    return tiles / (-(-tiles // programs) * programs)


WIDE_ROWS_MAX_K = 8192  # the largest K at which three warpgroups were timed faster


def row_scaled_variant(M: int, N: int, K: int, out_size: int, programs: int, shared_limit: int) -> GluonConfig:
    """The launch variant for scales constant along K: three warpgroups (192-row tiles) where K is at most
    WIDE_ROWS_MAX_K, their ring keeps its depth beside the output's staging (out_size bytes an element) and their
    programs' waves, weighed by the 192-row tile's speed, are at least as full as the 128-row tiles' of CONFIGS[0];
    else CONFIGS[0].

    The weight: per tile, three warpgroups ran 2 % faster (H200, 2026-12-05, bf16 out, per tensor: 8192^3 1215
    against 1163 TFLOPS in 21 waves 99.3 % full against 32 waves 97.0 % full; 4096^3 1077 against 1137, 6 waves
    89 % full against 8 97 % full; H100, the same day: 8192^3 1144 against 1125). The K limit: at 16384^3 they
    lost on an H100 (1043 against 1163 TFLOPS, waves 99.3 % full either way). Block-scaled products lose with them
    (one product tile a warpgroup). Since CONFIGS[0] rings 5 stages (three warpgroups keep 4: a fifth does not fit)
    the two are even at 8192^3 on an H100 (2026-12-06: 1200-1204 against 1195-1204 TFLOPS; untimed on an H200)."""
    two, three = CONFIGS[0], THREE_WARPGROUPS
    if (K <= WIDE_ROWS_MAX_K and ring_stages(three, out_size, shared_limit) == three.stages
            and 1.02 * _last_wave(three, M, N, programs) >= _last_wave(two, M, N, programs)):
        return three
    return two


def _launch(a_codes, b_codes, c, sa, sb, scale_strides, scale_per_k: bool, config: GluonConfig | None, split: int):
    (M, K), N = a_codes.shape, b_codes.shape[0]
    cfg = config or CONFIGS[0]
    if split < 1:
        raise ValueError(f"gluon_gemm: split must be at least 1, got {split}")
    pair = cfg.cluster == 2
    if pair and not (CLUSTER_AVAILABLE and scale_per_k and split == 1 and cfg.warpgroups == 2):
        raise ValueError(f"gluon_gemm: {cfg} runs block-scaled GEMMs with two warpgroups, unsplit, on triton 3.9 or "
                         f"later (this is {triton.__version__}, {'block-scaled' if scale_per_k else 'row-scaled'}, "
                         f"split {split})")
    rows = 64 * cfg.warpgroups * cfg.cluster  # of a tile
    tiles = -(-M // rows) * -(-N // TILE)
    grid = (min(sm_count(a_codes.device) // cfg.cluster, tiles * split), )  # programs: CTAs or pairs of them
    ws = torch.empty((split, M, N), dtype=torch.float32, device=c.device) if split > 1 else c
    stages = ring_stages(cfg, ws.element_size(), shared_memory(c.device))
    (a_rows, a_cga), (b_rows, b_cga) = operand_blocks(cfg)
    _fp8_gemm_kernel[grid](
        _codes_descriptor(a_codes, K, a_rows, a_cga), _codes_descriptor(b_codes, K, b_rows, b_cga), c,
        sa, sb, ws, M, N, K,
        c.stride(0), c.stride(1), *scale_strides,
        STAGES=stages, GROUP_M=cfg.group_m, CHAIN=cfg.chain, CONSUMER_REGS=cfg.consumer_regs,
        PRODUCER_REGS=cfg.producer_regs,
        SCALE_PER_K=scale_per_k, SPLIT=split, WGS=cfg.warpgroups, CLUSTER=cfg.cluster, num_warps=4,
        num_ctas=cfg.cluster, maxnreg=cfg.maxnreg)
    return sum_splits(ws, c) if split > 1 else c


def blockscaled_matmul(a_codes: torch.Tensor, sa: torch.Tensor, b_codes: torch.Tensor, sb: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, config: GluonConfig | None = None,
                       out: torch.Tensor | None = None, split: int = 1) -> torch.Tensor:
    """C = dequant(A) @ dequant(B)^T (M, N) in `out_dtype`, on an sm_90 GPU.

    a_codes (M, K) FP8 (float8_e4m3fn or float8_e5m2) with sa (M, ceil(K/128)) fp32 scales (1 x 128 groups);
    b_codes (N, K) FP8 with sb (ceil(N/128), ceil(K/128)) fp32 scales (128 x 128 tiles).
    Scales may have any strides. `config` picks a launch variant (default CONFIGS[0]). `out`: an (M, N)
    tensor of out_dtype to write into (any strides) instead of a new one. `split` > 1: each tile's K blocks
    are shared out over that many work items (whole pairs), their fp32 partials added in order by a second
    launch (launch.sum_splits): for shapes whose tiles leave SMs idle.
    """
    M, N, K, c = _output(a_codes, b_codes, out_dtype, out)
    kb = -(-K // K_BLOCK)
    if tuple(sa.shape) != (M, kb) or tuple(sb.shape) != (-(-N // SCALE_TILE), kb):
        raise ValueError(f"gluon_gemm: shapes A {list(a_codes.shape)} sa {list(sa.shape)} B {list(b_codes.shape)} "
                         f"sb {list(sb.shape)} do not fit the 1x128 x 128x128 recipe")
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    sa, sb = sa.float(), sb.float()
    return _launch(a_codes, b_codes, c, sa, sb, (sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1)), True, config,
                   split)


def _row_scales(s: torch.Tensor, rows: int, name: str) -> tuple:
    """(fp32 scales, stride between rows) of one scale (numel 1: stride 0) or one per row ((rows,))."""
    if s.numel() == 1:
        return s.float().reshape(1), 0
    if tuple(s.shape) != (rows, ):
        raise ValueError(f"gluon_gemm: {name} has shape {list(s.shape)}: expected one scale or ({rows},), one per row")
    s = s.float()
    return s, s.stride(0)


def rowscaled_matmul(a_codes: torch.Tensor, sa: torch.Tensor, b_codes: torch.Tensor, sb: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16, config: GluonConfig | None = None,
                     out: torch.Tensor | None = None, split: int = 1) -> torch.Tensor:
    """C = dequant(A) @ dequant(B)^T (M, N) in `out_dtype` for scales constant along K, on an sm_90 GPU.

    a_codes (M, K) and b_codes (N, K) FP8 (float8_e4m3fn or float8_e5m2, in any pairing); sa one
    scale (any shape of one element: per tensor) or (M,) (per row of A), sb one or (N,) (per row of
    B, a column of C); fp32 or any dtype .float() reads exactly. The K loop sums the MMA products of
    the codes, one fresh product per 128-wide K block added in fp32, and C = acc * (sa * sb), as in
    triton_gemm._scaled_gemm_kernel (with `split`, each partial scaled so). `config`, `out` and `split` as in
    blockscaled_matmul.
    """
    M, N, K, c = _output(a_codes, b_codes, out_dtype, out)
    (sa, sam), (sb, sbn) = _row_scales(sa, M, "sa"), _row_scales(sb, N, "sb")
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    return _launch(a_codes, b_codes, c, sa, sb, (sam, 0, sbn, 0), False, config, split)
