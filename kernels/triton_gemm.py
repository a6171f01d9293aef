"""Triton GEMMs on quantized operands: C = A @ B^T for A (M, K) and B (N, K), the nn.Linear convention.

`matmul` picks one of two kernels from the operand specs:

* _scaled_gemm_kernel, FP8 (E4M3/E5M2) or INT8 codes multiplied as they are on the tensor cores.
  - Scales that vary along K (1 x g groups, bm x g tiles, g a multiple of 128; the DeepSeek-style
    A 1x128 x B 128x128 recipe): every 128-wide K block's fp32 partial product is scaled by
    sa[row, k-group] * sb[col, k-group] before it joins the fp32 accumulator.
  - Scales constant along K (per tensor, or per row: channel axis 0): the K loop sums the codes
    alone (fp32 for FP8; int32 for INT8, with the int8_asym zero-point correction) and the scales
    are applied once at the end, exactly as reference._int8_matmul does.
* _mx_gemm_kernel, MXFP4 / MXFP8 operands (E8M0 scales over 1x32 groups), in any pairing, or NVFP4 x NVFP4
  (E4M3 scales over 1x16 groups, the two fp32 tensor scales divided out of the accumulator at the end): each tile
  is upcast in-kernel to bf16 with its power-of-two scale folded in (exact: E2M1/E4M3/E5M2 times a
  power of two fits bf16's 8-bit significand, except E4M3/E5M2 subnormals under the smallest scales,
  below 2**-133 where bf16 has no subnormal step left, which round), then multiplied on the bf16
  tensor cores in fp32. Compiled MXFP4 tiles are decoded a code byte at a time into a bf16x2 word by
  integer ops and two bf16x2 multiplies (e2m1x2_scaled); MXFP8 tiles and the interpreter go through
  fp32. Both give the same bf16 bits.

* gluon_gemm._fp8_gemm_kernel takes FP8 x FP8 (E4M3/E5M2, any pairing) on sm_90 GPUs for A 1x128 x
  B 128x128 scales and for scales constant along K (each operand per tensor or per row): warp-
  specialized, each MMA overlapped with the previous product's promotion; same products as the Triton kernel.

The Triton kernels are persistent (one or two programs per SM, each walking an L2-friendly tile order) and
read the codes through TMA tensor descriptors, whose zero fill beyond the edges handles ragged M, N, K.
FP8 GEMMs of few rows (KernelConfig.gemm_decode_m) split each tile's K blocks over programs
(SPLIT_K), their fp32 partials added in a fixed order (launch.sum_splits), INT8 ones with gemm_split_int8 too
(int32 partials, exact: the unsplit product's bits); with gemm_gluon_split the Gluon
kernel splits its K blocks so too where its tiles would leave half the SMs idle (_gluon_split).
Scales are read through plain pointers with any strides (row- or column-major).
"""
from __future__ import annotations

import copy

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import gluon_gemm
from .config import DEFAULT, KernelConfig
from .launch import inline_ptx, interpreting, shared_memory, sm_count, split_run, sum_splits, tile_offsets, tma_rows
from .spec import E2M1, OUT_DTYPES, Format, Granularity, QuantizedTensor
from .triton_elements import bf16_halves, e2m1x2_scaled, e4m3_value, e8m0_bf16x2

K_BLOCK = 128  # BLOCK_K of the FP8/INT8 kernel: K scale groups must be multiples of it
ONE_SCALE = 0  # "rows per scale" of an operand whose one scale covers every row



# ---- kernels ----------------------------------------------------------------------------------


_tile_offsets = triton.jit(tile_offsets)
_split_run = triton.jit(split_run)


@triton.jit
def _scale_ptrs(ptr, start, n, stride, ROWS: tl.constexpr, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """Pointers to the scales of rows start..start+BLOCK at K group 0, ROWS rows per scale.

    A single pointer when the whole block shares one scale, else a (BLOCK, 1) (AXIS 0) or
    (1, BLOCK) (AXIS 1) tensor of them; rows past the end read the last row's scale.
    """
    if ROWS == 0:
        return ptr
    elif ROWS % BLOCK == 0:
        return ptr + (start // ROWS) * stride
    else:
        rows = tl.minimum(start + tl.arange(0, BLOCK), n - 1)
        p = ptr + (rows // ROWS) * stride
        if AXIS == 0:
            return p[:, None]
        else:
            return p[None, :]


@triton.jit
def _store_tile(c_ptr, acc, off_m, off_n, M, N, stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scales_at_k(sa_ptrs, sb_ptrs, k, group_ka, group_kb, stride_sak, stride_sbk):
    """A's and B's scales of the K group that holds K index k."""
    return tl.load(sa_ptrs + (k // group_ka) * stride_sak), tl.load(sb_ptrs + (k // group_kb) * stride_sbk)


@triton.jit
def _scaled_gemm_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, za_ptr, zb_ptr, ws_ptr,
                        M, N, K, stride_cm, stride_cn,
                        stride_sam, stride_sak, stride_sbn, stride_sbk, stride_za, stride_zb,
                        group_ka, group_kb,
                        A_ROWS: tl.constexpr, B_ROWS: tl.constexpr,
                        SCALE_PER_K: tl.constexpr, IS_INT: tl.constexpr, HAS_ZP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, CTAS_PER_SM: tl.constexpr,
                        FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                        FP8_PROMOTE_K: tl.constexpr = None, PAIR_K: tl.constexpr = False,
                        SPLIT_K: tl.constexpr = 1):
    """C = (A codes x B codes^T) with A's and B's scales; see the module docstring.

    PAIR_K (used with SCALE_PER_K only): two K blocks an iteration, both MMAs issued before either
    product is scaled, so that the second runs on the tensor cores while the first is scaled.

    FP8_PROMOTE_K: K elements the FP8 MMA may sum in its reduced precision before the partial
    goes to fp32 (None: the whole BLOCK_K).

    SPLIT_K > 1: each output tile's K blocks are shared out in SPLIT_K runs (of whole pairs with PAIR_K), one
    work item each; an item writes its partial into plane `split` of ws_ptr ((SPLIT_K, M, N), contiguous): FP8
    its scaled fp32 sum, which launch.sum_splits adds up in order into C; INT8 its int32 sum (zero points'
    terms of its K range included, K * za * zb by split 0), which launch.sum_splits adds up exactly and then
    scales as this kernel does: C has the bits of the unsplit product.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    STEP: tl.constexpr = 2 if PAIR_K and SCALE_PER_K else 1
    for item in tl.range(tl.program_id(0), num_m * num_n * SPLIT_K, NUM_SMS * CTAS_PER_SM, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        split, k_first, k_last = _split_run(item, k_tiles, SPLIT_K, STEP)
        off_m, off_n = _tile_offsets(item // SPLIT_K, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        sa_ptrs = _scale_ptrs(sa_ptr, off_m, M, stride_sam, A_ROWS, BLOCK_M, 0)
        sb_ptrs = _scale_ptrs(sb_ptr, off_n, N, stride_sbn, B_ROWS, BLOCK_N, 1)
        if IS_INT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            sum_a = tl.zeros((BLOCK_M, 1), dtype=tl.int32)
            sum_b = tl.zeros((1, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SCALE_PER_K:  # the first K block's
            sa, sb = _scales_at_k(sa_ptrs, sb_ptrs, tl.minimum(k_first * BLOCK_K, K - 1), group_ka, group_kb,
                                  stride_sak, stride_sbk)
        else:  # K group 0, the only one
            sa = tl.load(sa_ptrs)
            sb = tl.load(sb_ptrs)
        for ki in range(k_first, k_last, STEP):
            k = ki * BLOCK_K
            a = a_desc.load([off_m, k])
            b = b_desc.load([off_n, k])
            if PAIR_K and SCALE_PER_K:
                # The second block may lie past K: TMA fills it with zeros, and its scales are clamped.
                k1 = k + BLOCK_K
                a1 = a_desc.load([off_m, k1])
                b1 = b_desc.load([off_n, k1])
                k1s = tl.minimum(k1, K - 1)
                sa1, sb1 = _scales_at_k(sa_ptrs, sb_ptrs, k1s, group_ka, group_kb, stride_sak, stride_sbk)
                k_next = tl.minimum(k + 2 * BLOCK_K, K - 1)
                p0 = tl.dot(a, b.T, max_num_imprecise_acc=FP8_PROMOTE_K)
                p1 = tl.dot(a1, b1.T, max_num_imprecise_acc=FP8_PROMOTE_K)
                acc += p0 * (sa * sb)
                acc += p1 * (sa1 * sb1)
                sa, sb = _scales_at_k(sa_ptrs, sb_ptrs, k_next, group_ka, group_kb, stride_sak, stride_sbk)
            elif IS_INT:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
                if HAS_ZP:
                    sum_a += tl.sum(a.to(tl.int32), axis=1, keep_dims=True)
                    sum_b += tl.sum(b.to(tl.int32), axis=1)[None, :]
            elif SCALE_PER_K:
                # The next block's scales are loaded a block ahead, so their latency hides behind this MMA.
                k_next = tl.minimum(k + BLOCK_K, K - 1)
                sa_next, sb_next = _scales_at_k(sa_ptrs, sb_ptrs, k_next, group_ka, group_kb, stride_sak, stride_sbk)
                # A fresh dot per K block: Hopper's FP8 MMA accumulates in reduced precision, so
                # each block's partial is promoted to the fp32 accumulator (and scaled there).
                acc += tl.dot(a, b.T, max_num_imprecise_acc=FP8_PROMOTE_K) * (sa * sb)
                sa = sa_next
                sb = sb_next
            else:
                acc += tl.dot(a, b.T, max_num_imprecise_acc=FP8_PROMOTE_K)
        if IS_INT:
            if HAS_ZP:
                za = tl.load(_scale_ptrs(za_ptr, off_m, M, stride_za, A_ROWS, BLOCK_M, 0)).to(tl.int32)
                zb = tl.load(_scale_ptrs(zb_ptr, off_n, N, stride_zb, B_ROWS, BLOCK_N, 1)).to(tl.int32)
                acc = acc - za * sum_b - zb * sum_a
                if SPLIT_K == 1:
                    acc = acc + K * za * zb
                else:  # by split 0 only: int32 sums wrap alike in any order, so the partials add up to these bits
                    acc = acc + tl.where(split == 0, K, 0) * za * zb
        if SPLIT_K == 1 or not IS_INT:  # INT8 partials stay int32, scaled after their exact sum
            if IS_INT:
                acc = acc.to(tl.float32)
            if not SCALE_PER_K:
                acc = acc * (sa * sb)
        if SPLIT_K == 1:
            _store_tile(c_ptr, acc, off_m, off_n, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)
        else:
            _store_tile(ws_ptr + split.to(tl.int64) * M * N, acc, off_m, off_n, M, N, N, 1, BLOCK_M, BLOCK_N)


@triton.jit
def _e2m1_to_f32(codes):
    """fp32 values of 4-bit E2M1 codes (any int tensor holding 0..15), built from the bits."""
    c = codes.to(tl.int32)
    exp = (c >> 1) & 3
    man = c & 1
    # exponent field 0 is the subnormal 0.5 (or zero); otherwise 2**(exp-1) * (1 + man/2)
    bits = tl.where(exp == 0, man * (126 << 23), ((exp + 126) << 23) | (man << 22))
    bits = bits | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(e):
    """2**(e - 127) as fp32 for E8M0 bits e (0 gives the subnormal 2**-127, 255 NaN as the reference reads it)."""
    e = e.to(tl.int32)
    return tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _scale_f32(e, SCALE_E4M3: tl.constexpr):
    """fp32 block scales of stored bits e: E4M3 (NVFP4) or E8M0 (MX)."""
    if SCALE_E4M3:
        f = e4m3_value(e.to(tl.int32))
    else:
        f = _e8m0_to_f32(e)
    return f


@triton.jit
def _scale_bf16x2(e, SCALE_E4M3: tl.constexpr):
    """Two bf16 copies of each block scale in an int32 word (both E4M3 and E8M0 values are exact in bf16)."""
    if SCALE_E4M3:
        h = (e4m3_value(e.to(tl.int32)).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
        w = h | (h << 16)
    else:
        w = e8m0_bf16x2(e)
    return w


@triton.jit
def _mx_tile(desc, s_ptrs, stride_sk, k_groups, off, k, FP4: tl.constexpr, ROWS: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP: tl.constexpr, DOT_FP32: tl.constexpr, PACKED: tl.constexpr,
             SCALE_E4M3: tl.constexpr):
    """Values (codes x scale) of an MX (or NVFP4) operand's (ROWS, BLOCK_K) tile at row `off`, column `k`.

    bf16, or fp32 if DOT_FP32. PACKED (MXFP4, launch.inline_ptx): each code byte becomes one bf16x2 word
    (e2m1x2_scaled), the same bf16 values as the fp32 path's.
    """
    if FP4:
        packed = desc.load([off, k // 2])
    else:
        packed = desc.load([off, k])
    g = k // GROUP + tl.arange(0, BLOCK_K // GROUP)
    if SCALE_E4M3:  # past K: a scale of 1 (E4M3 0x38) times the zero codes TMA fills in
        e = tl.load(s_ptrs + g[None, :] * stride_sk, mask=g[None, :] < k_groups, other=0x38)
    else:
        e = tl.load(s_ptrs + g[None, :] * stride_sk, mask=g[None, :] < k_groups, other=127)
    return _mx_values(packed, e, FP4, ROWS, BLOCK_K, GROUP, DOT_FP32, PACKED, SCALE_E4M3)


@triton.jit
def _mx_values(packed, e, FP4: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
               DOT_FP32: tl.constexpr, PACKED: tl.constexpr, SCALE_E4M3: tl.constexpr = False):
    """(ROWS, BLOCK_K) values of MX codes (MXFP4, NVFP4: (ROWS, BLOCK_K // 2) bytes; MXFP8: (ROWS, BLOCK_K)
    E4M3) under scale bits e (ROWS, BLOCK_K // GROUP), E8M0 or (SCALE_E4M3) E4M3; see _mx_tile."""
    if FP4 and PACKED:
        f = tl.broadcast_to(_scale_bf16x2(e, SCALE_E4M3)[:, :, None], (ROWS, BLOCK_K // GROUP, GROUP // 2))
        w = e2m1x2_scaled(packed.to(tl.int32), f.reshape(ROWS, BLOCK_K // 2))
        if DOT_FP32:  # the bf16 values widened exactly
            lo, hi = bf16_halves(w)
        else:
            lo = w.to(tl.int16).to(tl.bfloat16, bitcast=True)
            hi = (w >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.join(lo, hi).reshape(ROWS, BLOCK_K)
    if FP4:
        codes = tl.join(packed & 0xF, packed >> 4).reshape(ROWS, BLOCK_K)  # low nibble first
        vals = _e2m1_to_f32(codes)
    else:
        vals = packed.to(tl.float32)
    vals = vals.reshape(ROWS, BLOCK_K // GROUP, GROUP) * _scale_f32(e, SCALE_E4M3)[:, :, None]
    vals = vals.reshape(ROWS, BLOCK_K)
    if DOT_FP32:
        return vals
    else:
        return vals.to(tl.bfloat16)


@triton.jit
def _mx_gemm_kernel(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, ta_ptr, tb_ptr,
                    M, N, K, stride_cm, stride_cn, stride_sam, stride_sak, stride_sbn, stride_sbk,
                    A_FP4: tl.constexpr, B_FP4: tl.constexpr, GROUP: tl.constexpr, SCALE_E4M3: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, CTAS_PER_SM: tl.constexpr,
                    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, DOT_FP32: tl.constexpr,
                    PACKED: tl.constexpr = False):
    """C = dequant(A) x dequant(B)^T for MX operands, upcast per tile; see the module docstring.

    DOT_FP32 multiplies the same exact values in fp32 instead of bf16: the Triton interpreter's
    bf16 tl.dot reads the raw bits as integers (triton 3.9). PACKED decodes MXFP4 tiles in bf16x2
    PTX (compiled, or its model under the interpreter: launch.inline_ptx). SCALE_E4M3 (NVFP4): E4M3 block scales, and
    the accumulator divided by A's and then B's tensor scale (ta_ptr, tb_ptr) once after the K loop.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_groups = tl.cdiv(K, GROUP)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS * CTAS_PER_SM, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        off_m, off_n = _tile_offsets(tile, num_m, num_n, BLOCK_M, BLOCK_N, GROUP_M)
        sa_ptrs = _scale_ptrs(sa_ptr, off_m, M, stride_sam, 1, BLOCK_M, 0)
        sb_ptrs = _scale_ptrs(sb_ptr, off_n, N, stride_sbn, 1, BLOCK_N, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = _mx_tile(a_desc, sa_ptrs, stride_sak, k_groups, off_m, k, A_FP4, BLOCK_M, BLOCK_K, GROUP, DOT_FP32,
                         PACKED, SCALE_E4M3)
            b = _mx_tile(b_desc, sb_ptrs, stride_sbk, k_groups, off_n, k, B_FP4, BLOCK_N, BLOCK_K, GROUP, DOT_FP32,
                         PACKED, SCALE_E4M3)
            acc = tl.dot(a, b.T, acc, input_precision="ieee")
        if SCALE_E4M3:  # one division each: their product could leave fp32's range
            acc = tl.math.div_rn(tl.math.div_rn(acc, tl.load(ta_ptr)), tl.load(tb_ptr))
        _store_tile(c_ptr, acc, off_m, off_n, M, N, stride_cm, stride_cn, BLOCK_M, BLOCK_N)


# ---- launch configurations --------------------------------------------------------------------


def _set_block_shapes(nargs):
    """Give the TMA descriptors the tile shape of the config being launched (MXFP4 packs 2 a byte)."""
    bk = nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], bk // 2 if nargs.get("A_FP4") else bk]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], bk // 2 if nargs.get("B_FP4") else bk]


def _config(bm, bn, bk, warps, stages, flatten=False, ws=False, promote_k=None, ctas_per_sm=1, pair_k=False):
    """A launch config; ctas_per_sm > 1 starts that many persistent programs per SM (small tiles that
    fit twice, so one program's scaling math overlaps the other's MMA)."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "FLATTEN": flatten, "WARP_SPECIALIZE": ws,
              "CTAS_PER_SM": ctas_per_sm}
    if promote_k is not None:
        kwargs["FP8_PROMOTE_K"] = promote_k
    if pair_k:
        kwargs["PAIR_K"] = True
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


# Small plain lists, tried once per (M, N, K) on the GPU; the interpreter runs one small config.
# Each measured alone on an H100 (BENCHMARKS.md): the pair-K config is the block-scaled FP8 best
# (797 / 789 TFLOPS at 4096 / 8192, against 740 / 706 for the next two), 128x256 is INT8's and
# per-tensor FP8's at 8192.
SCALED_CONFIGS = [
    _config(128, 128, 128, 8, 3, pair_k=True),
    _config(128, 128, 128, 8, 4),
    _config(64, 128, 128, 4, 4, flatten=True, ctas_per_sm=2),
    _config(128, 256, 128, 8, 3),
]
MX_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 128, 8, 3),
    _config(128, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 3, ctas_per_sm=2),
]
INTERPRETER_CONFIG = [_config(32, 32, 128, 4, 1), _config(32, 32, 128, 4, 1, pair_k=True)]
# FP8 GEMMs of few rows whose K is split over programs (KernelConfig.gemm_decode_m): one tile shape, so that the
# split can be chosen from the tile count before the autotuner picks among them.
DECODE_CONFIGS = [
    _config(64, 128, 128, 4, 4),
    _config(64, 128, 128, 4, 6),
    _config(64, 128, 128, 8, 4, pair_k=True),
]


_AUTOTUNED = {}


def _launched(configs: list) -> list:
    """The configs a launch over `configs` tries: the interpreter runs its own small ones."""
    return INTERPRETER_CONFIG if interpreting() else configs


def _tuned(kernel, configs, one_k_block: bool = False):
    """`kernel` autotuned over `configs` (one small config under the interpreter), built once per list and
    one_k_block (a GEMM whose K is one K block: over _plain_twins of the list)."""
    configs = _launched(configs)
    if (kernel, id(configs), one_k_block) not in _AUTOTUNED:
        key = ["M", "N", "K", "SCALE_PER_K", "IS_INT", "HAS_ZP", "SPLIT_K"] if kernel is _scaled_gemm_kernel else [
            "M", "N", "K", "A_FP4", "B_FP4"]
        tried = _plain_twins(configs) if one_k_block else configs
        _AUTOTUNED[kernel, id(configs), one_k_block] = (configs, triton.autotune(configs=tried, key=key)(kernel))
    return _AUTOTUNED[kernel, id(configs), one_k_block][1]


def _plain_twins(configs: list) -> list:
    """`configs` with each pair-K config as its plain twin (the same tiles, warps and stages, one K block an
    iteration), duplicates left out: for a GEMM whose K is one K block, where a pair's second block is TMA's zero
    fill. Triton 3.8 compiles the pair-K config of 3 stages with K = 1 (a constant to it) into 262,168 bytes of shared
    memory, more than an H100 or H200 has (196,632 with any other K; 3.6 200,728), and an autotuner of one config
    launches it without trying it."""
    twins = []
    for c in configs:
        if c.kwargs.get("PAIR_K"):
            c = copy.copy(c)
            c.kwargs = {k: v for k, v in c.kwargs.items() if k != "PAIR_K"}
        if all(t.all_kwargs() != c.all_kwargs() for t in twins):
            twins.append(c)
    return twins


def _grid(M: int, N: int, num_sms: int, split: int = 1):
    """Persistent launch: CTAS_PER_SM programs per SM, never more than there are work items (tiles times K
    splits)."""
    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(num_sms * meta["CTAS_PER_SM"], tiles * split),)
    return grid


def _split_k(M: int, N: int, K: int, is_int: bool, device, config: KernelConfig) -> int:
    """K splits of an FP8 GEMM (INT8 too with config.gemm_split_int8) of at most config.gemm_decode_m rows (decode
    shapes, whose few output tiles would leave most SMs idle): enough for a work item a program, at most
    config.gemm_max_split and a K block a split. 1: no split (more rows, or tiles enough)."""
    if (is_int and not config.gemm_split_int8) or M > config.gemm_decode_m:
        return 1
    first = _launched(DECODE_CONFIGS)[0].kwargs
    tiles = triton.cdiv(M, first["BLOCK_M"]) * triton.cdiv(N, first["BLOCK_N"])
    return _splits(tiles, _num_programs(device, config), triton.cdiv(K, K_BLOCK), config)


def _gluon_split(M: int, N: int, K: int, device, config: KernelConfig) -> int:
    """K splits of a GEMM on the Gluon kernel (config.gemm_gluon_split): enough for a work item an SM where its
    128 x 128 tiles fill at most half of them, at most config.gemm_max_split and a pair of K blocks a split."""
    if not config.gemm_gluon_split:
        return 1
    tiles = triton.cdiv(M, gluon_gemm.TILE) * triton.cdiv(N, gluon_gemm.TILE)
    return _splits(tiles, sm_count(device), triton.cdiv(triton.cdiv(K, K_BLOCK), 2), config)


def _splits(tiles: int, programs: int, runs: int, config: KernelConfig) -> int:
    """K splits of a GEMM of `tiles` output tiles: enough for a work item a program, at most
    config.gemm_max_split and `runs` (the K blocks, or pairs of them, a tile has)."""
    return max(1, min(config.gemm_max_split, programs // tiles, runs))


def _num_programs(device, config: KernelConfig) -> int:
    if not config.gemm_persistent:
        return 1 << 30  # _grid caps it at one program a tile
    if interpreting() or device.type != "cuda":
        return 2  # still walks several tiles per program, as on the GPU
    return sm_count(device)


# ---- host side ----------------------------------------------------------------------------------


def _descriptor(codes: torch.Tensor, k: int) -> TensorDescriptor:
    """A TMA descriptor over 2-D codes with logical width `k` (bytes for packed MXFP4).

    Layouts TMA cannot read are copied first (launch.tma_rows).
    """
    codes = tma_rows(codes, k)
    # The block shape is a placeholder: _set_block_shapes sets the launched config's.
    return TensorDescriptor(codes, [codes.shape[0], k], [codes.stride(0), 1], [16, 16])


def _k_scales(qt: QuantizedTensor, name: str):
    """How an FP8/INT8 operand's scales map onto (row, K): (fp32 scales, stride_row, stride_k, rows per scale, K group).

    K group is None when the scales are constant along K (per tensor, per row).
    """
    spec, s = qt.spec, qt.scales
    s = s if s.dtype == torch.float32 else s.float()  # pow2 scales are E8M0
    g = spec.granularity
    if g == Granularity.TENSOR:
        return s, 0, 0, ONE_SCALE, None
    if g == Granularity.CHANNEL and spec.axis in (0, -2):
        return s, s.stride(0), 0, 1, None
    if g == Granularity.GROUP and spec.group_size % K_BLOCK == 0:
        return s, s.stride(0), s.stride(1), 1, spec.group_size
    if g == Granularity.TILE and spec.tile[1] % K_BLOCK == 0:
        return s, s.stride(0), s.stride(1), spec.tile[0], spec.tile[1]
    raise ValueError(f"matmul: operand {name} ({spec.describe()}) is not supported by the Triton GEMM: it needs "
                     f"scales per tensor, per row (channel axis 0), or over K groups that are multiples of {K_BLOCK}")


def _zero_points(qt: QuantizedTensor, needed: bool) -> tuple:
    """(zero points, stride); a zero when the operand is symmetric but the other is not, and
    any tensor (never read) when neither operand has zero points."""
    zp = qt.zero_points
    if zp is None:
        return (torch.zeros(1, dtype=torch.int8, device=qt.codes.device) if needed else qt.codes), 0
    return zp, (zp.stride(0) if zp.dim() else 0)


def _constant_along_k(spec) -> bool:
    """Scales per tensor or per row (channel, axis 0): the same at every K."""
    return spec.granularity == Granularity.TENSOR or (spec.granularity == Granularity.CHANNEL and spec.axis in (0, -2))


def _gluon_recipe(a: QuantizedTensor, b: QuantizedTensor) -> str | None:
    """Which mode of gluon_gemm's kernel computes A @ B^T, from the operands alone (any device):
    "block-scaled" (A in 1 x 128 groups, B in 128 x 128 tiles), "row-scaled" (each operand per tensor
    or per row), or None; both operands FP8 (E4M3 or E5M2, in any pairing), not MX."""
    if a.spec.is_mx or b.spec.is_mx or a.codes.dtype not in gluon_gemm.CODE_DTYPES or \
            b.codes.dtype not in gluon_gemm.CODE_DTYPES:
        return None
    if (a.spec.granularity == Granularity.GROUP and a.spec.group_size == K_BLOCK
            and b.spec.granularity == Granularity.TILE and tuple(b.spec.tile) == (K_BLOCK, K_BLOCK)):
        return "block-scaled"
    if _constant_along_k(a.spec) and _constant_along_k(b.spec):
        return "row-scaled"
    return None


def _gluon_applies(a: QuantizedTensor, b: QuantizedTensor, device: torch.device,
                   config: KernelConfig = DEFAULT) -> bool:
    """Whether gluon_gemm takes A @ B^T: a recipe it implements (_gluon_recipe), on an sm_90 GPU with
    a triton that has the Gluon Hopper API (never under the interpreter), unless config.use_gluon is off."""
    return (config.use_gluon and gluon_gemm.AVAILABLE and not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9 and _gluon_recipe(a, b) is not None)


def _scaled_matmul(a: QuantizedTensor, b: QuantizedTensor, c: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    (M, K), N = a.shape, b.shape[0]
    is_int = a.spec.element.kind == "int"
    sa, sam, sak, a_rows, ga = _k_scales(a, "A")
    sb, sbn, sbk, b_rows, gb = _k_scales(b, "B")
    split = _split_k(M, N, K, is_int, c.device, config)
    if split == 1 and _gluon_applies(a, b, c.device, config):
        gluon_split = _gluon_split(M, N, K, c.device, config)
        if _gluon_recipe(a, b) == "row-scaled":
            variant = None
            if config.gemm_gluon_wide_rows and gluon_split == 1:
                variant = gluon_gemm.row_scaled_variant(M, N, K, c.element_size(), sm_count(c.device),
                                                        shared_memory(c.device))
            return gluon_gemm.rowscaled_matmul(a.codes, sa, b.codes, sb, c.dtype, variant, out=c, split=gluon_split)
        return gluon_gemm.blockscaled_matmul(a.codes, sa, b.codes, sb, c.dtype, out=c, split=gluon_split)
    per_k = ga is not None or gb is not None
    if is_int and per_k:
        raise ValueError("matmul: int8 operands must be quantized per tensor or per row (channel, axis 0)")
    has_zp = a.zero_points is not None or b.zero_points is not None
    za, stride_za = _zero_points(a, has_zp)
    zb, stride_zb = _zero_points(b, has_zp)
    num_sms = _num_programs(c.device, config)
    configs = DECODE_CONFIGS if split > 1 else config.scaled_gemm_configs or SCALED_CONFIGS
    ws = torch.empty((split, M, N), dtype=torch.int32 if is_int else torch.float32, device=c.device) if split > 1 else c
    _tuned(_scaled_gemm_kernel, configs, K <= K_BLOCK)[_grid(M, N, num_sms, split)](
        _descriptor(a.codes, K), _descriptor(b.codes, K), c, sa, sb, za, zb, ws,
        M, N, K, c.stride(0), c.stride(1), sam, sak, sbn, sbk, stride_za, stride_zb,
        ga or K_BLOCK, gb or K_BLOCK, A_ROWS=a_rows, B_ROWS=b_rows,
        SCALE_PER_K=per_k, IS_INT=is_int, HAS_ZP=has_zp, NUM_SMS=num_sms, SPLIT_K=split)
    if split > 1:
        sum_splits(ws, c, (sa, sam, sb, sbn) if is_int else None)
    return c


def _mx_matmul(a: QuantizedTensor, b: QuantizedTensor, c: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    (M, K), N = a.shape, b.shape[0]
    a_fp4, b_fp4 = a.spec.element is E2M1, b.spec.element is E2M1
    sa, sb = a.scales.view(torch.uint8), b.scales.view(torch.uint8)
    nvfp4 = a.spec.format == Format.NVFP4
    ta, tb = (a.tensor_scale, b.tensor_scale) if nvfp4 else (c, c)  # never read for MX
    num_sms = _num_programs(c.device, config)
    _tuned(_mx_gemm_kernel, config.mx_gemm_configs or MX_CONFIGS)[_grid(M, N, num_sms)](
        _descriptor(a.codes, a.codes.shape[1]), _descriptor(b.codes, b.codes.shape[1]), c, sa, sb, ta, tb,
        M, N, K, c.stride(0), c.stride(1), sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1),
        A_FP4=a_fp4, B_FP4=b_fp4, GROUP=a.spec.group_size, SCALE_E4M3=nvfp4, NUM_SMS=num_sms,
        DOT_FP32=interpreting(),
        PACKED=config.packed_decode and inline_ptx())
    return c


def _check_operand(qt: QuantizedTensor, name: str) -> None:
    spec = qt.spec
    if qt.codes.dtype != spec.code_dtype:
        raise TypeError(f"matmul: operand {name} codes are {qt.codes.dtype}, "
                        f"its spec {spec.describe()} stores {spec.code_dtype}")
    if tuple(qt.codes.shape) != spec.code_shape(qt.shape):
        raise ValueError(f"matmul: operand {name} codes have shape {list(qt.codes.shape)}, "
                         f"expected {list(spec.code_shape(qt.shape))} for a {list(qt.shape)} tensor")
    if tuple(qt.scales.shape) != spec.scale_shape(qt.shape):
        raise ValueError(f"matmul: operand {name} scales have shape {list(qt.scales.shape)}, "
                         f"expected {list(spec.scale_shape(qt.shape))} for {spec.describe()}")


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16, *,
           config: KernelConfig = DEFAULT) -> torch.Tensor:
    """C = A @ B^T (M, N) in `out_dtype` for quantized A (M, K) and B (N, K), on the GPU (or the interpreter).

    FP8 x FP8 (scales per tensor, per row, or over K groups of multiples of 128 such as
    A 1x128 x B 128x128), INT8 x INT8 (sym or asym, per tensor or per row), MXFP4/MXFP8 x
    MXFP4/MXFP8 and NVFP4 x NVFP4. Raises ValueError/TypeError for anything else. config: the kernel choices (kernels/config.py).
    """
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"matmul: expected A (M, K) and B (N, K), got {list(a.shape)} and {list(b.shape)}")
    if out_dtype not in OUT_DTYPES.values():
        raise TypeError(f"matmul: out_dtype {out_dtype} is not supported (expected bfloat16, float16 or float32)")
    if a.codes.device != b.codes.device:
        raise ValueError(f"matmul: operands on different devices ({a.codes.device} and {b.codes.device})")
    if a.codes.device.type != "cuda" and not interpreting():
        raise ValueError("matmul: the Triton GEMM needs CUDA tensors (or TRITON_INTERPRET=1)")
    _check_operand(a, "A")
    _check_operand(b, "B")
    kinds = {a.spec.element.kind, b.spec.element.kind}
    if len(kinds) != 1:
        raise ValueError("matmul: cannot mix integer and floating-point operands")
    if _upcast_kind(a.spec) != _upcast_kind(b.spec):
        raise ValueError(f"matmul: the Triton GEMM pairs MX operands with MX ones and NVFP4 with NVFP4, "
                         f"not {a.spec.describe()} x {b.spec.describe()}")
    (M, K), N = a.shape, b.shape[0]
    # The interpreter's fp32->bf16 cast truncates; there the kernel writes fp32 and torch rounds.
    kernel_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    c = torch.empty((M, N), dtype=kernel_dtype, device=a.codes.device)
    if M == 0 or N == 0 or K == 0:
        return c.zero_().to(out_dtype)
    return (_mx_matmul if _upcast_kind(a.spec) else _scaled_matmul)(a, b, c, config).to(out_dtype)


def _upcast_kind(spec) -> str | None:
    """Which operands _mx_gemm_kernel upcasts: "mx", "nvfp4"; None for the scaled kernel's."""
    return "mx" if spec.is_mx else "nvfp4" if spec.format == Format.NVFP4 else None
