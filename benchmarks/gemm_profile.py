"""One launch each of the Gluon block-scaled GEMM, cuBLAS blockwise, the Gluon per-tensor GEMM and cuBLAS per tensor
at N^3 (FP8 E4M3, bf16 out), between cudaProfilerStart and cudaProfilerStop, for a profiler that starts there:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section LaunchStats \\
        --section WarpStateStats python3 benchmarks/gemm_profile.py [N]

Each is run twice before (compilation, cuBLAS's heuristics), so that only the four timed launches are profiled.
"""
from __future__ import annotations

import sys

import torch

from gemm import TENSOR, cublas_blockwise, cublas_per_tensor
from gluon_gemm_check import operands
from quantd.kernels import gluon_gemm


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    qa, qb = operands(n, n, n, 0)
    ta, tb = operands(n, n, n, 1, TENSOR, TENSOR)
    runs = [lambda: gluon_gemm.blockscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales, torch.bfloat16),
            cublas_blockwise(qa, qb)[0],
            lambda: gluon_gemm.rowscaled_matmul(ta.codes, ta.scales, tb.codes, tb.scales, torch.bfloat16),
            lambda: cublas_per_tensor(ta, tb)]
    for run in runs:
        run()
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
