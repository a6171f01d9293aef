"""GEMM throughput of kernels/triton_gemm against cuBLAS, all in one run on one GPU.

    python benchmarks/gemm.py --out DIR [--sizes 2048 4096 8192] [--no-sweep] [--decode M ...] [--decode-nk 8192]

For square M = N = K it times each GEMM (median of triton.testing.do_bench, eager, and of
do_bench_cudagraph, GPU time without Python launch cost) and reports TFLOPS = 2 M N K / t:
  triton block-scaled FP8 (A 1x128, B 128x128)   vs  cuBLAS blockwise (torch scaled_mm,
                                                     BlockWise1x128 x BlockWise128x128), and torchao's
                                                     Triton kernel for the same recipe (if importable)
  triton per-tensor FP8 (Gluon on sm_90, and the   vs  cuBLAS per-tensor FP8 (torch._scaled_mm)
  Triton kernel)
  triton INT8 (per-row scales)                   vs  cuBLAS int8 (torch._int_mm, int32 out, unscaled)
  triton MXFP4 x MXFP4, MXFP8 x MXFP4, NVFP4 x    vs  bf16 torch.matmul
  NVFP4 (upcast)
Decode shapes (M = 1..256 rows against one N = K weight) compare the block-scaled GEMM with cuBLAS blockwise.
The sweep then times block-scaled launch configs alone (the autotuned list plus variants:
flatten, warp specialization, promotion every 32, 2 programs per SM, non-persistent, pair-K) at sizes >= 4096.
Writes DIR/gemm.json and DIR/gemm_tflops.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import torch
import triton
import triton.testing

from peers import torchao_blockwise
from quantd.kernels import reference, triton_gemm
from quantd.kernels.config import DEFAULT
from quantd.kernels.spec import QuantizedTensor, QuantSpec

BLOCK_A = QuantSpec("fp8_e4m3", "group", group_size=128)
BLOCK_B = QuantSpec("fp8_e4m3", "tile", tile=(128, 128))
TENSOR = QuantSpec("fp8_e4m3", "tensor")
INT8_ROW = QuantSpec("int8_sym", "channel", axis=0)

NO_GLUON = dataclasses.replace(DEFAULT, use_gluon=False)  # the Triton kernel where Gluon would apply
SPLIT_K = dataclasses.replace(DEFAULT, gemm_decode_m=1 << 30)  # decode shapes with their K split over programs
GLUON_SPLIT = dataclasses.replace(DEFAULT, gemm_decode_m=0, gemm_gluon_split=True)  # the Gluon kernel's split K
INT8_SPLIT = dataclasses.replace(SPLIT_K, gemm_split_int8=True)  # INT8 decode shapes split too


def bench(fn) -> tuple:
    """Median ms of `fn`: eager (do_bench, Python launch cost included) and replayed from a CUDA graph
    (do_bench_cudagraph: GPU time alone)."""
    fn()  # compile and autotune outside the timing
    eager = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return eager, graph


def cublas_blockwise(qa, qb):
    """cuBLAS 1x128 x 128x128 through torch: the scaled_mm API if present, else _scaled_mm's shape rules.

    cuBLAS wants A's scales M-major (column-major (M, K/128)) and B's as (K/128, N/128), K-major.
    """
    a, b = qa.codes, qb.codes.t()
    s = qa.scales  # column-major with strides (1, M) even for M = 1, where .contiguous() would keep (1, K/128)
    sa = torch.empty_strided(s.shape, (1, s.shape[0]), dtype=s.dtype, device=s.device).copy_(s)
    sb = qb.scales.t()
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        st = F.ScalingType
        fn = lambda: F.scaled_mm(a, b, sa, st.BlockWise1x128, sb, st.BlockWise128x128,  # noqa: E731
                                 output_dtype=torch.bfloat16)
        api = "torch.nn.functional.scaled_mm"
    else:
        fn = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
        api = "torch._scaled_mm"
    return fn, api


def cublas_per_tensor(ta, tb, out_dtype=torch.bfloat16, fast_accum=False) -> torch.Tensor:
    """cuBLAS per-tensor FP8 through torch._scaled_mm: A @ B^T of two per-tensor quantized operands."""
    return torch._scaled_mm(ta.codes, tb.codes.t(), scale_a=ta.scales.reshape(()), scale_b=tb.scales.reshape(()),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """The reference quantizer (plain torch) on the GPU tensor, or on the CPU if an op is missing there."""
    try:
        return reference.quantize(x, spec)
    except Exception as e:
        print(f"reference.quantize on the GPU failed ({type(e).__name__}: {e}); quantizing on the CPU", flush=True)
        qt = reference.quantize(x.cpu(), spec)
        return QuantizedTensor.from_stored({name: t.to(x.device) for name, t in qt.stored().items()}, spec, qt.shape)


def relative_error(c, ref) -> float:
    return float((c.double() - ref.double()).norm() / ref.double().norm())


def fp64_product(qa, qb) -> torch.Tensor:
    """The reference product (dequantized operands in fp64), computed on the GPU."""
    return reference.dequantize(qa, torch.float32).double() @ reference.dequantize(qb, torch.float32).double().T


def accuracy(s: int, results: dict) -> None:
    """Relative error against the fp64 product: ours and cuBLAS, fp32 out where cuBLAS allows it."""
    gen = torch.Generator(device="cuda").manual_seed(s + 1)
    x = torch.randn(s, s, device="cuda", generator=gen)
    w = torch.randn(s, s, device="cuda", generator=gen)
    row = {}
    qa, qb = quantize(x, BLOCK_A), quantize(w, BLOCK_B)
    ref = fp64_product(qa, qb)
    row["triton block-scaled fp32 out"] = relative_error(triton_gemm.matmul(qa, qb, torch.float32), ref)
    row["triton block-scaled bf16 out"] = relative_error(triton_gemm.matmul(qa, qb, torch.bfloat16), ref)
    row["fp64 product rounded to bf16"] = relative_error(ref.float().bfloat16(), ref)
    try:
        row["cublas blockwise bf16 out"] = relative_error(cublas_blockwise(qa, qb)[0](), ref)
    except Exception as e:
        print(f"cuBLAS blockwise unavailable: {type(e).__name__}: {str(e)[:300]}", flush=True)
    ta, tb = quantize(x, TENSOR), quantize(w, TENSOR)
    ref = fp64_product(ta, tb)
    row["triton per-tensor fp32 out"] = relative_error(triton_gemm.matmul(ta, tb, torch.float32), ref)
    for fast in (False, True):
        c = cublas_per_tensor(ta, tb, torch.float32, fast)
        row[f"cublas per-tensor fp32 out{' fast accum' if fast else ''}"] = relative_error(c, ref)
    for name, err in row.items():
        print(f"accuracy {s:6d} {name:40s} {err:.3e}", flush=True)
    results["accuracy"][str(s)] = row


def run_size(s: int, results: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(s)
    x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(s, s, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops = 2.0 * s ** 3
    row = {}

    def record(name, fn):
        try:
            eager, graph = bench(fn)
            row[name] = flops / graph / 1e9
            row[name + " (eager)"] = flops / eager / 1e9
            print(f"{s:6d} {name:34s} graph {graph:8.3f} ms {row[name]:8.1f} TFLOPS | "
                  f"eager {eager:8.3f} ms {row[name + ' (eager)']:8.1f} TFLOPS", flush=True)
        except Exception as e:  # a peer missing on this build is reported, not fatal
            row[name] = None
            print(f"{s:6d} {name:34s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    # Operands quantized once by the reference (plain torch; it runs on the GPU tensors).
    qa, qb = quantize(x, BLOCK_A), quantize(w, BLOCK_B)
    ours = lambda: triton_gemm.matmul(qa, qb, torch.bfloat16)  # noqa: E731
    record("triton fp8 block-scaled", ours)  # matmul: the Gluon kernel where it applies (sm_90)
    record("triton fp8 block-scaled, Triton kernel",
           lambda: triton_gemm.matmul(qa, qb, torch.bfloat16, config=NO_GLUON))
    try:
        cublas, api = cublas_blockwise(qa, qb)
        results["cublas_blockwise_api"] = api
        row["blockwise rel diff vs cublas"] = relative_error(ours(), cublas())
        record("cublas fp8 blockwise", cublas)
    except Exception as e:
        print(f"cuBLAS blockwise unavailable: {type(e).__name__}: {str(e)[:500]}", flush=True)
        row["cublas fp8 blockwise"] = None

    tao = torchao_blockwise()
    if tao is not None:  # its layouts: B column-major (K, N), both scale tensors column-major
        a_s, b_s = qa.scales.t().contiguous().t(), qb.scales.t()
        record("torchao triton fp8 blockwise", lambda: tao.triton_fp8_gemm_1x128_128x128(
            qa.codes, qb.codes.t(), a_s, b_s, out_dtype=torch.bfloat16))
        row["torchao rel diff vs ours"] = relative_error(
            tao.triton_fp8_gemm_1x128_128x128(qa.codes, qb.codes.t(), a_s, b_s, out_dtype=torch.float32),
            triton_gemm.matmul(qa, qb, torch.float32))

    ta, tb = quantize(x, TENSOR), quantize(w, TENSOR)
    record("triton fp8 per-tensor", lambda: triton_gemm.matmul(ta, tb, torch.bfloat16))  # Gluon on sm_90
    record("triton fp8 per-tensor, Triton kernel",
           lambda: triton_gemm.matmul(ta, tb, torch.bfloat16, config=NO_GLUON))
    record("cublas fp8 per-tensor", lambda: cublas_per_tensor(ta, tb))
    record("cublas bf16", lambda: torch.matmul(x, w.t()))

    ia, ib = quantize(x, INT8_ROW), quantize(w, INT8_ROW)
    record("triton int8 per-row", lambda: triton_gemm.matmul(ia, ib, torch.bfloat16))
    record("cublas int8 (_int_mm, int32 out)", lambda: torch._int_mm(ia.codes, ib.codes.t()))

    ma, mb = quantize(x, QuantSpec("mxfp4")), quantize(w, QuantSpec("mxfp4"))
    m8 = quantize(x, QuantSpec("mxfp8"))
    record("triton mxfp4 x mxfp4", lambda: triton_gemm.matmul(ma, mb, torch.bfloat16))
    record("triton mxfp8 x mxfp4", lambda: triton_gemm.matmul(m8, mb, torch.bfloat16))
    na, nb = quantize(x, QuantSpec("nvfp4")), quantize(w, QuantSpec("nvfp4"))
    record("triton nvfp4 x nvfp4", lambda: triton_gemm.matmul(na, nb, torch.bfloat16))
    results["sizes"][str(s)] = row


def run_decode(ms, nk: int, results: dict) -> None:
    """Decode shapes: A (M, nk) for each M of `ms` against one weight B (nk, nk); the block-scaled FP8 GEMM (as
    shipped, with its K split over programs by the Triton kernel (KernelConfig.gemm_decode_m) and by the Gluon
    kernel (gemm_gluon_split, where its tiles leave half the SMs idle)) against cuBLAS blockwise and bf16; INT8
    per row, unsplit and split (gemm_split_int8), against torch._int_mm (int32 out, no scaling) (graph-replayed
    times; TFLOPS and the ratios to cuBLAS)."""
    gen = torch.Generator(device="cuda").manual_seed(nk)
    w = torch.randn(nk, nk, device="cuda", dtype=torch.bfloat16, generator=gen)
    qb, ib = quantize(w, BLOCK_B), quantize(w, INT8_ROW)
    for m in ms:
        x = torch.randn(m, nk, device="cuda", dtype=torch.bfloat16, generator=gen)
        qa, ia = quantize(x, BLOCK_A), quantize(x, INT8_ROW)
        row = {}
        for name, make in [("triton fp8 block-scaled", lambda: lambda: triton_gemm.matmul(qa, qb, torch.bfloat16)),
                           ("triton fp8 block-scaled, split K", lambda: lambda: triton_gemm.matmul(
                               qa, qb, torch.bfloat16, config=SPLIT_K)),
                           ("gluon fp8 block-scaled, split K", lambda: lambda: triton_gemm.matmul(
                               qa, qb, torch.bfloat16, config=GLUON_SPLIT)),
                           ("cublas fp8 blockwise", lambda: cublas_blockwise(qa, qb)[0]),
                           ("cublas bf16", lambda: lambda: torch.matmul(x, w.t())),
                           ("triton int8 per-row", lambda: lambda: triton_gemm.matmul(ia, ib, torch.bfloat16)),
                           ("triton int8 per-row, split K", lambda: lambda: triton_gemm.matmul(
                               ia, ib, torch.bfloat16, config=INT8_SPLIT)),
                           ("cublas int8 (_int_mm, int32 out)", lambda: lambda: torch._int_mm(ia.codes, ib.codes.t()))]:
            try:
                _, graph = bench(make())
                row[name] = 2.0 * m * nk * nk / graph / 1e9
            except Exception as e:  # cuBLAS blockwise refuses some shapes: reported, not fatal
                row[name] = None
                print(f"decode M={m} {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        if row["triton fp8 block-scaled"] and row["cublas fp8 blockwise"]:
            row["triton / cublas blockwise"] = row["triton fp8 block-scaled"] / row["cublas fp8 blockwise"]
        if row["triton fp8 block-scaled, split K"] and row["cublas fp8 blockwise"]:
            row["split K / cublas blockwise"] = row["triton fp8 block-scaled, split K"] / row["cublas fp8 blockwise"]
        if row["triton int8 per-row, split K"] and row["cublas int8 (_int_mm, int32 out)"]:
            row["int8 split K / cublas int8"] = (row["triton int8 per-row, split K"]
                                                 / row["cublas int8 (_int_mm, int32 out)"])
        if row["gluon fp8 block-scaled, split K"] and row["cublas fp8 blockwise"]:
            row["gluon split K / cublas blockwise"] = (row["gluon fp8 block-scaled, split K"]
                                                       / row["cublas fp8 blockwise"])
        print(f"decode M={m:4d} N=K={nk}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if v), flush=True)
        results["decode"][f"{m}x{nk}"] = row


def sweep(sizes, results: dict) -> None:
    """Block-scaled launch configs timed alone: the autotuned list and a few variants of it."""
    base = triton_gemm.SCALED_CONFIGS
    make = triton_gemm._config
    variants = [(c, False) for c in base] + [
        (make(128, 128, 128, 8, 4, flatten=True), False),
        (make(128, 128, 128, 8, 4), True),
        (make(128, 128, 128, 8, 4, ws=True), False),
        (make(128, 128, 128, 8, 4, promote_k=32), False),
        (make(64, 128, 128, 4, 3, flatten=True, ctas_per_sm=2), False),
        (make(128, 64, 128, 4, 4, ctas_per_sm=2), False),
        (make(64, 256, 128, 8, 3), False),
        (make(64, 128, 128, 4, 3, flatten=True, ctas_per_sm=2, pair_k=True), False),
        (make(64, 128, 128, 4, 4, ctas_per_sm=2, pair_k=True), False),
    ]
    for s in sizes:
        gen = torch.Generator(device="cuda").manual_seed(s)
        x = torch.randn(s, s, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(s, s, device="cuda", dtype=torch.bfloat16, generator=gen)
        qa, qb = quantize(x, BLOCK_A), quantize(w, BLOCK_B)
        ref = fp64_product(qa, qb)
        for cfg, one_tile_per_program in variants:
            kw = dict(cfg.kwargs)
            name = (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
                    f"{' flatten' if kw['FLATTEN'] else ''}{' ws' if kw['WARP_SPECIALIZE'] else ''}"
                    f"{' promote%d' % kw['FP8_PROMOTE_K'] if kw.get('FP8_PROMOTE_K') else ''}"
                    f"{' %d/SM' % kw['CTAS_PER_SM'] if kw['CTAS_PER_SM'] > 1 else ''}"
                    f"{' pair-k' if kw.get('PAIR_K') else ''}"
                    f"{' non-persistent' if one_tile_per_program else ''}")
            config = dataclasses.replace(NO_GLUON, scaled_gemm_configs=(cfg,),
                                         gemm_persistent=not one_tile_per_program)
            try:
                ms = bench(lambda: triton_gemm.matmul(qa, qb, torch.bfloat16, config=config))[1]
                tflops = 2.0 * s ** 3 / ms / 1e9
                err = relative_error(triton_gemm.matmul(qa, qb, torch.float32, config=config), ref)
                print(f"sweep {s:6d} {name:50s} {ms:8.3f} ms {tflops:8.1f} TFLOPS  rel err (fp32 out) {err:.2e}",
                      flush=True)
            except Exception as e:
                tflops = None
                print(f"sweep {s:6d} {name:50s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results["sweep"].setdefault(str(s), {})[name] = tflops


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted(results["sizes"], key=int)
    names = list(results["sizes"][sizes[-1]])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in names:
        if "rel diff" in name or " / " in name or "(eager)" in name:
            continue
        pts = [(int(s), results["sizes"][s].get(name)) for s in sizes]
        pts = [(s, t) for s, t in pts if t]
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="--" if name.startswith("cublas") else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(s) for s in sizes], [f"{s}³" for s in sizes])
    ax.set_xlabel("M = N = K")
    ax.set_ylabel("TFLOPS (2MNK / median time)")
    title = (f"quantd GEMMs, {results['device']}\n"
             f"torch {results['torch']}, triton {results['triton']}, {results['date']}")
    ax.set_title(title + (f"\n{results['note']}" if results.get("note") else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for gemm.json and gemm_tflops.png")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-config sweep")
    parser.add_argument("--decode", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                        help="decode M values, against N = K = --decode-nk (none: skip)")
    parser.add_argument("--decode-nk", type=int, default=8192)
    parser.add_argument("--plot-only", metavar="JSON", help="redraw gemm_tflops.png in --out from a saved gemm.json "
                        "(an optional top-level 'note' becomes a subtitle)")
    args = parser.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(args.out, "gemm_tflops.png"))
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gemm.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "sizes": {}, "sweep": {}, "accuracy": {}, "decode": {},
    }
    print(json.dumps({k: v for k, v in results.items() if k not in ("sizes", "sweep")}), flush=True)
    for s in args.sizes:
        run_size(s, results)
    accuracy(4096, results)
    run_decode(args.decode, args.decode_nk, results)
    for s in args.sizes:
        row = results["sizes"][str(s)]
        for ours, peer in [("triton fp8 block-scaled", "cublas fp8 blockwise"),
                           ("triton fp8 per-tensor", "cublas fp8 per-tensor"),
                           ("triton fp8 block-scaled", "cublas bf16"), ("triton int8 per-row", "cublas bf16"),
                           ("triton mxfp4 x mxfp4", "cublas bf16"), ("triton nvfp4 x nvfp4", "cublas bf16")]:
            for mode in ("", " (eager)"):
                if row.get(ours + mode) and row.get(peer + mode):
                    row[f"{ours} / {peer}{mode}"] = row[ours + mode] / row[peer + mode]
                    print(f"{s:6d} ratio {ours} / {peer}{mode}: {row[ours + mode] / row[peer + mode]:.3f}", flush=True)
    with open(os.path.join(args.out, "gemm.json"), "w") as f:
        json.dump(results, f, indent=1)
    results["autotuned"] = {f"{getattr(tuner.fn, '__name__', 'kernel')} {key}": str(config)
                            for _, tuner in triton_gemm._AUTOTUNED.values() for key, config in tuner.cache.items()}
    for name, config in results["autotuned"].items():
        print(f"autotuned {name}: {config}", flush=True)
    with open(os.path.join(args.out, "gemm.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "gemm_tflops.png"))
    except ImportError as e:
        print(f"no plot ({e}); redraw it elsewhere with --plot-only {args.out}/gemm.json", flush=True)
    if not args.no_sweep:
        sweep([s for s in args.sizes if s >= 4096] or args.sizes[-1:], results)
        with open(os.path.join(args.out, "gemm.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"wrote {args.out}/gemm.json and {args.out}/gemm_tflops.png", flush=True)


if __name__ == "__main__":
    main()
