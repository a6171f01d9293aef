"""Correctness and speed of each launch variant of the Gluon block-scaled FP8 GEMM (kernels/gluon_gemm.py) on an H100.

    python benchmarks/gluon_gemm_check.py [--sizes 4096 8192] [--no-bench]

(a) For M x N x K in 128^3, 257 x 383 x 1100 (ragged), 1000 x 1000 x 4096 and 4096^3, operands quantized
    by the reference (A 1x128 groups, B 128x128 tiles), every launch variant of gluon_gemm.CONFIGS:
    relative Frobenius error of fp32 and bf16 output against the fp64 product of the dequantized
    operands, relative difference to the Triton kernel (triton_gemm.matmul without Gluon, fp32 out; expected
    <= 1e-6), and the same product with column-major scales (expected identical).
(b) At each --sizes S (S^3): median GPU time (triton.testing.do_bench_cudagraph) and TFLOPS of each
    variant, of the Triton kernel and of cuBLAS blockwise (gemm.cublas_blockwise), and the ratios.
Each variant is tried on its own: a failure is printed and the others still run (a CUDA fault, though,
poisons the context for everything after it; a hang needs the caller's timeout).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch
import triton
import triton.testing

from gemm import BLOCK_A, BLOCK_B, cublas_blockwise, fp64_product, relative_error
from quantd.kernels import gluon_gemm, reference, triton_gemm

SHAPES = [(128, 128, 128), (257, 383, 1100), (1000, 1000, 4096), (4096, 4096, 4096)]


def operands(m: int, n: int, k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen)
    return reference.quantize(x, BLOCK_A), reference.quantize(w, BLOCK_B)


def report_failure(what: str, e: Exception) -> None:
    print(f"{what}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    traceback.print_exc(limit=3)


def check(gg, shapes) -> bool:
    ok = True
    for m, n, k in shapes:
        qa, qb = operands(m, n, k, m + n + k)
        ref = fp64_product(qa, qb)
        ours_triton = triton_gemm.matmul(qa, qb, torch.float32)
        print(f"check {m}x{n}x{k}: triton_gemm fp32 out rel err {relative_error(ours_triton, ref):.3e}, "
              f"fp64 product rounded to bf16 {relative_error(ref.float().bfloat16(), ref):.3e}", flush=True)
        for cfg in gg.CONFIGS:
            try:
                c32 = gg.blockscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales, torch.float32, config=cfg)
                c16 = gg.blockscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales, torch.bfloat16, config=cfg)
                ccm = gg.blockscaled_matmul(qa.codes, qa.scales.t().contiguous().t(), qb.codes,
                                            qb.scales.t().contiguous().t(), torch.float32, config=cfg)
                torch.cuda.synchronize()
                err32, err16 = relative_error(c32, ref), relative_error(c16, ref)
                vs_triton = relative_error(c32, ours_triton)
                col_major_same = bool(torch.equal(c32, ccm))
                good = err32 < 3e-4 and err16 < 5e-3 and vs_triton <= 1e-6 and col_major_same
                ok &= good
                print(f"check {m}x{n}x{k} {cfg!r}: rel err fp32 {err32:.3e} bf16 {err16:.3e} | vs triton_gemm "
                      f"{vs_triton:.1e} | column-major scales identical {col_major_same} -> {'ok' if good else 'BAD'}",
                      flush=True)
            except Exception as e:
                ok = False
                report_failure(f"check {m}x{n}x{k} {cfg!r}", e)
    return ok


def bench(gg, sizes) -> None:
    for s in sizes:
        qa, qb = operands(s, s, s, s)
        flops = 2.0 * s ** 3
        rows = {}

        def record(name, fn):
            try:
                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                rows[name] = flops / ms / 1e9
                print(f"bench {s:5d} {name:60s} {ms:8.3f} ms {rows[name]:7.1f} TFLOPS", flush=True)
            except Exception as e:
                report_failure(f"bench {s:5d} {name}", e)

        record("cublas blockwise (torch scaled_mm)", cublas_blockwise(qa, qb)[0])
        record("triton_gemm.matmul", lambda: triton_gemm.matmul(qa, qb, torch.bfloat16))
        for cfg in gg.CONFIGS:
            record(repr(cfg), lambda cfg=cfg: gg.blockscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales,
                                                                     torch.bfloat16, config=cfg))
        for name, tflops in rows.items():
            if name.startswith("gluon"):
                ratios = [f"{tflops / rows[peer]:.3f} x {peer.split()[0]}" for peer in
                          ("triton_gemm.matmul", "cublas blockwise (torch scaled_mm)") if rows.get(peer)]
                print(f"ratio {s:5d} {name:60s} " + ", ".join(ratios), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gluon_gemm_check.py needs a CUDA GPU")
    gg = gluon_gemm
    triton_gemm.USE_GLUON = False  # "triton_gemm.matmul" below is the Triton kernel, the variants' yardstick
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"gluon available: {gg.AVAILABLE} {gg.UNAVAILABLE_REASON}", flush=True)
    if not gg.AVAILABLE:
        sys.exit(1)
    t0 = time.time()
    ok = check(gg, SHAPES)
    print(f"correctness: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)", flush=True)
    if not args.no_bench:
        bench(gg, args.sizes)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
