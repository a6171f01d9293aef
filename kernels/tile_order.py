"""The order in which the persistent GEMM programs walk their output tiles.

Plain Python, compiled by triton.jit (triton_gemm) and by gluon.jit (gluon_gemm): one source for both.
"""
import triton.language as tl


def tile_offsets(tile, num_m, num_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of `tile`, walking GROUP_M row-tiles per column so B tiles stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N
