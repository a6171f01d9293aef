"""Correctness and speed of each launch variant of the Gluon FP8 GEMM (kernels/gluon_gemm.py) on an H100, in
both of its modes: block-scaled (A 1x128 x B 128x128) and scales constant along K (per tensor / per row).

    python benchmarks/gluon_gemm_check.py [--sizes 4096 8192] [--no-bench] [--no-check] [--group-m 4 16] [--pair]

(a) For M x N x K in 128^3, 257 x 383 x 1100 (ragged), 1000 x 1000 x 4096 and 4096^3, operands quantized
    by the reference (A 1x128 groups, B 128x128 tiles), every launch variant of gluon_gemm.CONFIGS:
    relative Frobenius error of fp32 and bf16 output against the fp64 product of the dequantized
    operands, relative difference to the Triton kernel (triton_gemm.matmul without Gluon, fp32 out; expected
    <= 1e-6), and the same product with column-major scales (expected identical).
(b) The same shapes per tensor (E4M3 x E4M3, every variant) and per row (A E4M3 x B E5M2, the default
    variant): relative error of fp32 and bf16 output against the fp64 product, and both outputs against
    the Triton kernel's (its first launch config, the one the GPU tests compare with; expected identical).
(c) At each --sizes S (S^3): median GPU time (triton.testing.do_bench_cudagraph) and TFLOPS of each
    variant (per tensor also of the one triton_gemm.matmul picks), of the Triton kernel and of cuBLAS: blockwise
    (gemm.cublas_blockwise) for the block-scaled product, per-tensor torch._scaled_mm (use_fast_accum=False) for
    the per-tensor one; and the ratios.
--pair: gluon_gemm.PAIR (programs of two CTAs, B multicast; triton 3.9 on) among the block-scaled variants of (a)
and (c); it hung on an H100 at 257 x 383 x 1100 (BENCHMARKS.md): run it under a timeout until that is fixed.
Each variant is tried on its own: a failure is printed and the others still run (a CUDA fault, though, poisons the
context for everything after it; a hang needs the caller's timeout). Exit status 1 when (a) or (b) found a failure,
after (c) ran.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import traceback

import torch
import triton
import triton.testing

from gemm import BLOCK_A, BLOCK_B, TENSOR, cublas_blockwise, cublas_per_tensor, fp64_product, relative_error
from quantd.kernels import gluon_gemm, reference, triton_gemm
from quantd.kernels.config import DEFAULT
from quantd.kernels.spec import QuantSpec

# "triton_gemm.matmul" here is the Triton kernel, the variants' yardstick
NO_GLUON = dataclasses.replace(DEFAULT, use_gluon=False)

ROW_A, ROW_B = QuantSpec("fp8_e4m3", "channel", axis=0), QuantSpec("fp8_e5m2", "channel", axis=0)

SHAPES = [(128, 128, 128), (257, 383, 1100), (1000, 1000, 4096), (4096, 4096, 4096)]


def operands(m: int, n: int, k: int, seed: int, spec_a=BLOCK_A, spec_b=BLOCK_B):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen)
    return reference.quantize(x, spec_a), reference.quantize(w, spec_b)


def report_failure(what: str, e: Exception) -> None:
    print(f"{what}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    traceback.print_exc(limit=3)


def check(gg, shapes, pair: bool = False) -> bool:
    ok = True
    for m, n, k in shapes:
        qa, qb = operands(m, n, k, m + n + k)
        ref = fp64_product(qa, qb)
        ours_triton = triton_gemm.matmul(qa, qb, torch.float32, config=NO_GLUON)
        print(f"check {m}x{n}x{k}: triton_gemm fp32 out rel err {relative_error(ours_triton, ref):.3e}, "
              f"fp64 product rounded to bf16 {relative_error(ref.float().bfloat16(), ref):.3e}", flush=True)
        for cfg in list(gg.CONFIGS) + ([gg.PAIR] if pair else []):
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


def triton_kernel(qa, qb, out_dtype):
    """The Triton kernel's product (never Gluon) with its first launch config alone."""
    config = dataclasses.replace(NO_GLUON, scaled_gemm_configs=tuple(triton_gemm.SCALED_CONFIGS[:1]))
    return triton_gemm.matmul(qa, qb, out_dtype, config=config)


def check_row_scaled(gg, shapes) -> bool:
    ok = True
    for m, n, k in shapes:
        for name, spec_a, spec_b, configs in [("per-tensor e4m3 x e4m3", TENSOR, TENSOR, gg.CONFIGS),
                                              ("per-row e4m3 x e5m2", ROW_A, ROW_B, gg.CONFIGS[:1])]:
            what = f"check {name} {m}x{n}x{k}"
            try:
                qa, qb = operands(m, n, k, m + n + k, spec_a, spec_b)
                ref = fp64_product(qa, qb)
                t32, t16 = triton_kernel(qa, qb, torch.float32), triton_kernel(qa, qb, torch.bfloat16)
                print(f"{what}: triton_gemm fp32 out rel err {relative_error(t32, ref):.3e}", flush=True)
            except Exception as e:
                ok = False
                report_failure(what, e)
                continue
            for cfg in configs:
                try:
                    c32 = gg.rowscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales, torch.float32, config=cfg)
                    c16 = gg.rowscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales, torch.bfloat16, config=cfg)
                    torch.cuda.synchronize()
                    err32, err16 = relative_error(c32, ref), relative_error(c16, ref)
                    same32, same16 = bool(torch.equal(c32, t32)), bool(torch.equal(c16, t16))
                    good = err32 < 3e-4 and err16 < 5e-3 and same32 and same16
                    ok &= good
                    print(f"{what} {cfg!r}: rel err fp32 {err32:.3e} bf16 {err16:.3e} | vs triton_gemm "
                          f"{relative_error(c32, t32):.1e}, identical fp32 {same32} bf16 {same16} "
                          f"-> {'ok' if good else 'BAD'}", flush=True)
                except Exception as e:
                    ok = False
                    report_failure(f"{what} {cfg!r}", e)
    return ok


def regrouped(cfg, group_m: int):
    """cfg with its tiles walked in groups of group_m tile rows."""
    cfg = copy.copy(cfg)
    cfg.group_m = group_m
    return cfg


def bench(gg, sizes, group_ms=(), only=(), pair: bool = False) -> None:
    """(c) above; group_ms: also CONFIGS[0] and THREE_WARPGROUPS with their tiles walked in those groups; only: the
    variants whose name ends with one of these (all if none); pair: gluon_gemm.PAIR too (block-scaled only)."""
    configs = list(gg.CONFIGS) + [regrouped(cfg, g) for g in group_ms for cfg in (gg.CONFIGS[0], gg.THREE_WARPGROUPS)]
    pairs = [gg.PAIR] if pair else []
    configs = [cfg for cfg in configs if not only or repr(cfg).endswith(tuple(only))]
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
        record("triton_gemm.matmul", lambda: triton_gemm.matmul(qa, qb, torch.bfloat16, config=NO_GLUON))
        for cfg in configs + pairs:
            record(repr(cfg), lambda cfg=cfg: gg.blockscaled_matmul(qa.codes, qa.scales, qb.codes, qb.scales,
                                                                     torch.bfloat16, config=cfg))
        for name, tflops in rows.items():
            if name.startswith("gluon"):
                ratios = [f"{tflops / rows[peer]:.3f} x {peer.split()[0]}" for peer in
                          ("triton_gemm.matmul", "cublas blockwise (torch scaled_mm)") if rows.get(peer)]
                print(f"ratio {s:5d} {name:60s} " + ", ".join(ratios), flush=True)

        ta, tb = operands(s, s, s, s, TENSOR, TENSOR)
        rows.clear()
        record("per-tensor cublas (torch _scaled_mm)", lambda: cublas_per_tensor(ta, tb))
        record("per-tensor triton_gemm.matmul", lambda: triton_gemm.matmul(ta, tb, torch.bfloat16, config=NO_GLUON))
        record("per-tensor gluon, the variant matmul picks (row_scaled_variant)",
               lambda: triton_gemm.matmul(ta, tb, torch.bfloat16))
        for cfg in configs:
            record(f"per-tensor {cfg!r}", lambda cfg=cfg: gg.rowscaled_matmul(
                ta.codes, ta.scales, tb.codes, tb.scales, torch.bfloat16, config=cfg))
        for name, tflops in rows.items():
            if name.startswith("per-tensor gluon"):
                ratios = [f"{tflops / rows[peer]:.3f} x {peer.split()[1]}" for peer in
                          ("per-tensor triton_gemm.matmul", "per-tensor cublas (torch _scaled_mm)") if rows.get(peer)]
                print(f"ratio {s:5d} {name:60s} " + ", ".join(ratios), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip (a) and (b)")
    ap.add_argument("--group-m", type=int, nargs="*", default=[],
                    help="also time the default and the three-warpgroup variants with tiles walked in these groups")
    ap.add_argument("--only", nargs="*", default=[], metavar="END",
                    help="time only the variants whose names end so (e.g. 'stages5 chain8 group8 regs240/24')")
    ap.add_argument("--pair", action="store_true", help="gluon_gemm.PAIR too (block-scaled: checked and timed)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gluon_gemm_check.py needs a CUDA GPU")
    gg = gluon_gemm
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"gluon available: {gg.AVAILABLE} {gg.UNAVAILABLE_REASON}", flush=True)
    if not gg.AVAILABLE:
        sys.exit(1)
    t0 = time.time()
    ok = ok_rows = True
    if not args.no_check:
        ok = check(gg, SHAPES, args.pair)
        print(f"correctness, block-scaled: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)", flush=True)
        ok_rows = check_row_scaled(gg, SHAPES)
        print(f"correctness, per tensor / per row: {'all ok' if ok_rows else 'FAILURES'} ({time.time() - t0:.0f} s)",
              flush=True)
    if not args.no_bench:
        bench(gg, args.sizes, args.group_m, args.only, args.pair)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    if not (ok and ok_rows):
        sys.exit("benchmarks/gluon_gemm_check.py: correctness FAILURES (above)")


if __name__ == "__main__":
    main()
