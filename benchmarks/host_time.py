"""The host's time a call of small quantize / dequantize calls: replayed from launch plans (kernels/plans.py), run
through our Python and Triton's launch (QUANTD_PLANS=0), and the bare launches of that call alone (Triton's
`kernel[grid](...)`, and the compiled kernels through their own launcher).

    python benchmarks/host_time.py [--n 1024] [--calls 2000] [CASE ...]

CASE names a row of profile_kernels.CASES. The GPU work of an n = 1024 call takes a few microseconds, so the
host's time is the call's time: every tensor below ~256 MiB is bound by it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import triton
from triton.runtime import jit

from profile_kernels import runner
from quantd.kernels.config import DEFAULT

CASES = ["e4m3_1x128", "e4m3_128x128", "mxfp4", "int8_asym", "tensor", "tensor_given", "tensor_delayed", "nvfp4",
         "nvfp4_given", "mxfp4_deq", "dual"]


def per_call_us(fn, calls: int) -> float:
    """Microseconds of host time a call, the GPU queue kept ahead (its work is shorter than the host's)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took / calls * 1e6


def launches_of(fn) -> list:
    """(JITFunction, args, kwargs, grid, CompiledKernel) of each launch of one unplanned call of fn."""
    seen, run = [], jit.JITFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        seen.append((self, args, kwargs, grid, kernel))
        return kernel
    jit.JITFunction.run = recording
    os.environ["QUANTD_PLANS"] = "0"
    try:
        fn()
    finally:
        jit.JITFunction.run = run
        os.environ.pop("QUANTD_PLANS")
    return seen


def compiled_launches(launches):
    """Each launch as (CompiledKernel[grid], every parameter's value): the launcher Triton's run ends in."""
    out = []
    device = triton.runtime.driver.active.get_current_device()
    for fn, args, kwargs, grid, kernel in launches:
        bound, _, _ = fn.device_caches[device][-1](*args, **kwargs)  # the binder (triton 3.6)
        out.append((kernel[tuple(grid) + (1,) * (3 - len(grid))], tuple(bound.values())))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=CASES)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    x = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16) * 3
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {args.n}^2 bf16, "
          f"host us a call")
    print(f"{'case':<16} {'planned':>8} {'unplanned':>10} {'launches':>9} {'triton':>8} {'launcher':>9}")
    for name in args.cases:
        fn = runner(x, name, DEFAULT)
        planned = per_call_us(fn, args.calls)
        os.environ["QUANTD_PLANS"] = "0"
        unplanned = per_call_us(fn, args.calls)
        os.environ.pop("QUANTD_PLANS")
        launches = launches_of(fn)
        bare = per_call_us(lambda: [f.run(*a, grid=g, warmup=False, **kw) for f, a, kw, g, _ in launches], args.calls)
        direct = compiled_launches(launches)
        launcher = per_call_us(lambda: [run(*values) for run, values in direct], args.calls)
        print(f"{name:<16} {planned:8.1f} {unplanned:10.1f} {len(launches):9d} {bare:8.1f} {launcher:9.1f}", flush=True)


if __name__ == "__main__":
    main()
