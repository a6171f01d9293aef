"""Quantize / dequantize bandwidth on the GPU, against a device-to-device copy and peers.

GB/s counts the bytes each op must move (input read once, codes, scales and outputs
written once); every ratio is taken against the copy measured in the same run.
Bounds: a kernel that only moves the bytes of a quantizer (bf16 in, byte codes or E2M1 pairs out) or of a
dequantizer, scales aside (_traffic_kernel). Peers: torch.compile of the reference (dynamic=False), torchao's
blockwise FP8 Triton quantizers (if importable) and a DeepSeek-style act_quant (one 128-group per program,
amax / 448, x / s), written here.

    python3 benchmarks/quantize.py [--out DIR] [--sweep] [--no-compile] [--sizes N ...]

(quantd importable: pip install -e .)

Writes DIR/quantize_bench.json and DIR/quantize_bandwidth.png (GB/s against size).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

from peers import torchao_blockwise
from quantd.kernels import reference, triton_quantize
from quantd.kernels.config import DEFAULT, DUAL_PLAN_H100, OneBlock
from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.kernels.triton_dequantize import dequantize

quantize, quantize_dual = triton_quantize.quantize, triton_quantize.quantize_dual


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, BLOCK_SIZE: tl.constexpr):
    """DeepSeek-V3-style activation quantization: one 1 x 128 group a program."""
    pid = tl.program_id(axis=0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs).to(tl.float32)
    s = tl.max(tl.abs(x)) / 448.0
    y = (x / s).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y)
    tl.store(s_ptr + pid, s)


def act_quant(x, y, s):
    _act_quant_kernel[(x.numel() // 128,)](x, y, s, BLOCK_SIZE=128)


@triton.jit
def _traffic_kernel(x_ptr, y_ptr, n_words, BLOCK: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr,
                    EVICT: tl.constexpr):
    """Reads BLOCK int32 words of x a program and writes BLOCK * OUT / IN words of y (IN words folded into one by
    xor, or one word spread over OUT): the traffic of a quantizer or dequantizer without its arithmetic. EVICT:
    the loads' L2 eviction policy ("" or "evict_first")."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(x_ptr + offs, mask=offs < n_words, other=0, eviction_policy=EVICT)
    if IN > 1:
        out = tl.xor_sum(tl.reshape(w, (BLOCK // IN, IN)), axis=1)
        o = tl.program_id(0) * (BLOCK // IN) + tl.arange(0, BLOCK // IN)
        tl.store(y_ptr + o, out, mask=o < n_words // IN)
    else:
        out = tl.reshape(w[:, None] + tl.arange(0, OUT)[None, :], (BLOCK * OUT, ))
        o = tl.program_id(0) * (BLOCK * OUT) + tl.arange(0, BLOCK * OUT)
        tl.store(y_ptr + o, out, mask=o < n_words * OUT)


def traffic_bound(n_in: int, ratio: float) -> tuple:
    """(median ms, bytes moved) of the fastest of a few launches of _traffic_kernel reading n_in bytes and
    writing n_in * ratio (ratio 1/2 or 1/4: a quantizer to bytes or to E2M1 codes; 2 or 4: their dequantizers),
    scales left out: a bound on the time of any kernel that moves those bytes."""
    words = n_in // 4
    x = torch.randint(-2**31, 2**31 - 1, (words, ), device="cuda", dtype=torch.int32)
    fold, spread = (round(1 / ratio), 1) if ratio < 1 else (1, round(ratio))
    y = torch.empty(words * spread // fold, device="cuda", dtype=torch.int32)
    best = min(bench(lambda: _traffic_kernel[(triton.cdiv(words, block), )](x, y, words, BLOCK=block, IN=fold,
                                                                              OUT=spread, EVICT=evict, num_warps=warps))
               for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8), (16384, 16))
               for evict in ("", "evict_first"))
    return best, n_in + y.numel() * 4


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_copy(x) -> tuple:
    """(median ms, GB/s read + written) of a device-to-device copy of `x`: the reference of every ratio."""
    dst = torch.empty_like(x)
    ms = bench(lambda: dst.copy_(x))
    return ms, 2 * x.numel() * x.element_size() / ms / 1e6


def quant_bytes(x, spec) -> int:
    n = x.numel()
    codes = math.prod(spec.code_shape(x.shape))
    scales = math.prod(spec.scale_shape(x.shape)) * (4 if spec.scale_dtype == torch.float32 else 1)
    zps = math.prod(spec.scale_shape(x.shape)) if spec.format.value == "int8_asym" else 0
    tensor_scale = 4 if spec.format.value == "nvfp4" else 0
    return n * x.element_size() + codes + scales + zps + tensor_scale


def op_bytes(x, spec, op: str) -> int:
    """Bytes an op must move: quantize reads x and writes codes, scales (and zero points); dequantize reads
    those and writes bf16; dual reads x once and writes both layouts' codes and scales."""
    if op == "dequantize":
        return x.numel() * 2 + quant_bytes(x, spec) - x.numel() * x.element_size()
    if op == "dual":
        return quant_bytes(x, spec) + quant_bytes(x.T, spec) - x.numel() * x.element_size()
    return quant_bytes(x, spec)


CASES = [  # (name, spec)
    ("fp8 e4m3 1x128", QuantSpec()),
    ("fp8 e4m3 128x128", QuantSpec(granularity="tile", tile=(128, 128))),
    ("fp8 e4m3 1x128 pow2", QuantSpec(scale_encoding="pow2")),
    ("mxfp8", QuantSpec(format="mxfp8")),
    ("mxfp4", QuantSpec(format="mxfp4")),
    ("int8 sym 1x128", QuantSpec(format="int8_sym")),
    ("int8 asym 1x128", QuantSpec(format="int8_asym")),
    ("fp8 e4m3 tensor", QuantSpec(granularity="tensor")),
    ("int8 sym channel0", QuantSpec(format="int8_sym", granularity="channel", axis=0)),
    ("fp8 e4m3 128x128 pow2", QuantSpec(granularity="tile", tile=(128, 128), scale_encoding="pow2")),
    ("int8 sym 128x128", QuantSpec(format="int8_sym", granularity="tile", tile=(128, 128))),
    ("nvfp4", QuantSpec(format="nvfp4")),  # two passes: the tensor amax, then the codes (x is read twice)
]


def run_main(n: int, rows: list, with_compile: bool):
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) * 3
    t_copy, copy_gbs = time_copy(x)
    rows.append(dict(n=n, op="copy", name="torch copy", ms=t_copy, gbs=copy_gbs, ratio=1.0))
    print(f"{n:>6} copy {t_copy:8.3f} ms {copy_gbs:7.0f} GB/s", flush=True)

    def add(op, name, ms, nbytes):
        gbs = nbytes / ms / 1e6
        rows.append(dict(n=n, op=op, name=name, ms=ms, gbs=gbs, ratio=gbs / copy_gbs))
        print(f"{n:>6} {op:<10} {name:<55} {ms:8.3f} ms {gbs:7.0f} GB/s {gbs / copy_gbs:6.3f} x copy", flush=True)

    # What any kernel moving an op's bytes takes, scales aside: bf16 in, byte codes or E2M1 pairs out, and back.
    for what, ratio in (("bf16 -> bytes (a quantizer)", 0.5), ("bf16 -> E2M1 pairs", 0.25),
                        ("bytes -> bf16 (a dequantizer)", 2), ("E2M1 pairs -> bf16", 4)):
        n_in = x.numel() * 2 if ratio < 1 else round(x.numel() * 2 / ratio)
        add("bound", "traffic only: " + what, *traffic_bound(n_in, ratio))
    for name, spec in CASES:
        qt = quantize(x, spec)
        add("quantize", name, bench(lambda: quantize(x, spec)), op_bytes(x, spec, "quantize"))
        add("dequantize", name + " -> bf16", bench(lambda: dequantize(qt, torch.bfloat16)),
            op_bytes(x, spec, "dequantize"))
    # Delayed scaling: the per-tensor scale from an earlier amax, this tensor's amax found in the same read. The
    # scale is on the host, as a service's request carries it (scales on the GPU are read back to be checked).
    tensor = CASES[7][1]
    scale = reference.tensor_scale(reference.amax(x), tensor).cpu()
    add("quantize", "fp8 e4m3 tensor, delayed scale: one read + amax",
        bench(lambda: triton_quantize.quantize_with_amax(x, tensor, scale)), op_bytes(x, tensor, "quantize"))
    nvfp4 = QuantSpec("nvfp4")
    nvfp4_scale = reference.tensor_scale(reference.amax(x), nvfp4).cpu()
    add("quantize", "nvfp4, given tensor scale: one read + amax",
        bench(lambda: triton_quantize.quantize_with_amax(x, nvfp4, nvfp4_scale)), op_bytes(x, nvfp4, "quantize"))
    spec = QuantSpec()
    dual_bytes = op_bytes(x, spec, "dual")
    add("quantize", "fp8 e4m3 dual 1x128 + 128x1", bench(lambda: quantize_dual(x, spec)), dual_bytes)
    # The same two results without the dual kernel (its bytes counted the same way, so the ratio compares times).
    add("quantize", "  same by quantize(X), X^T copied, quantize(X^T)",
        bench(lambda: (quantize(x, spec), quantize(x.T.contiguous(), spec))), dual_bytes)
    y = torch.empty(x.shape, device="cuda", dtype=torch.float8_e4m3fn)
    s = torch.empty(x.numel() // 128, device="cuda", dtype=torch.float32)
    add("quantize", "peer: DeepSeek act_quant 1x128", bench(lambda: act_quant(x, y, s)), quant_bytes(x, spec))
    tao = torchao_blockwise()
    if tao is not None:
        add("quantize", "peer: torchao 1x128 act_quant_lhs",
            bench(lambda: tao.triton_fp8_blockwise_act_quant_lhs(x, 128)),
            quant_bytes(x, spec))
        add("quantize", "peer: torchao 128x128 weight_quant_rhs",
            bench(lambda: tao.triton_fp8_blockwise_weight_quant_rhs(x, 128)), quant_bytes(x, CASES[1][1]))
    if with_compile:
        for name, spec in CASES[:2]:
            f = torch.compile(lambda t, spec=spec: reference.quantize_tensors(t, spec), dynamic=False)
            f(x)
            add("quantize", "peer: torch.compile reference " + name, bench(lambda: f(x)), quant_bytes(x, spec))
        qt = quantize(x, QuantSpec())
        g = torch.compile(lambda c, s_: reference.dequantize(QuantizedTensor(c, s_, qt.spec, qt.shape), torch.bfloat16),
                          dynamic=False)
        g(qt.codes, qt.scales)
        add("dequantize", "peer: torch.compile reference fp8 e4m3 1x128 -> bf16",
            bench(lambda: g(qt.codes, qt.scales)), op_bytes(x, qt.spec, "dequantize"))


# What --sweep tries: (cases, settings), a setting being fields of the KernelConfig (kernels/config.py)
# changed from DEFAULT (the first setting of each group is the shipped one).
# A case is (name, spec, shape, op), op "quantize", "dual" or "dequantize".
SWEEP_N = 16384
SQUARE = (SWEEP_N, SWEEP_N)
OB = OneBlock
SWEEPS = [
    ([("fp8 e4m3 128x128", CASES[1][1], SQUARE, "quantize"), ("fp8 e4m3 128x128 pow2", CASES[9][1], SQUARE, "quantize"),
      ("fp8 e5m2 128x128", QuantSpec(format="fp8_e5m2", granularity="tile", tile=(128, 128)), SQUARE, "quantize"),
      ("fp8 e4m3 channel0", QuantSpec(granularity="channel", axis=0), SQUARE, "quantize")],
     [dict(one_block_float=ob) for ob in (DEFAULT.one_block_float, OB(False, 1, 32, 64, None),
                                          OB(True, 0, 128, 128, None), OB(True, 0, 64, 64, None),
                                          OB(True, 0, 64, 32, 128, 128))]),
    ([("int8 sym 128x128", CASES[10][1], SQUARE, "quantize"),
      ("int8 asym 128x128", QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), SQUARE, "quantize"),
      ("int8 sym channel0", CASES[8][1], SQUARE, "quantize")],
     [dict(one_block_int=ob) for ob in (DEFAULT.one_block_int, OB(False, 1, 32, 64, None),
                                        OB(False, 1, 32, 16, None), OB(False, 0, 32, 16, None), OB(False, 1, 16, 8, None))]),
    ([("fp8 e4m3 128x128", CASES[1][1], SQUARE, "dequantize"),
      ("int8 asym 128x128", QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), SQUARE, "dequantize")],
     [dict(dequant_split=n, dequant_tile_elems=t) for n, t in ((128, 4096), (1, 8192), (16, 8192), (64, 8192), (128, 8192),
                                                               (16, 4096), (128, 2048), (64, 2048))]),
    ([("fp8 e4m3 1x128", CASES[0][1], SQUARE, "dequantize"), ("mxfp8", CASES[3][1], SQUARE, "dequantize"),
      ("mxfp4", CASES[4][1], SQUARE, "dequantize"), ("int8 asym 1x128", CASES[6][1], SQUARE, "dequantize"),
      ("fp8 e4m3 tensor", CASES[7][1], SQUARE, "dequantize"), ("nvfp4", QuantSpec("nvfp4"), SQUARE, "dequantize")],
     [dict(dequant_tile_elems=t) for t in (2048, 4096, 1024)]
     + [dict(dequant_fp4_tile=t) for t in ((4096, 4), (1024, 1), (2048, 1), (4096, 2))]),
    ([("fp8 e4m3 tensor", CASES[7][1], SQUARE, "quantize"), ("fp8 e4m3 tensor", CASES[7][1], SQUARE, "delayed"),
      ("int8 sym tensor", QuantSpec(format="int8_sym", granularity="tensor"), SQUARE, "quantize"),
      ("int8 asym tensor", QuantSpec(format="int8_asym", granularity="tensor"), SQUARE, "quantize")],
     [dict(guarded_quotient=g) for g in (True, False)]),
    ([("fp8 e4m3 tensor", CASES[7][1], SQUARE, "quantize")],
     [dict(stats_programs=p) for p in (1024, 2048, 512)] + [dict(stats_tile_elems=8192, stats_warps=8)]),
    ([("nvfp4", QuantSpec("nvfp4"), SQUARE, "quantize")],
     [{}] + [dict(nvfp4_launch=launch) for launch in ((1, 64, 2), (2, 32, 1), (1, 32, 1), (4, 16, 2))]),
    ([("fp8 e4m3 dual 1x128 + 128x1", QuantSpec(), SQUARE, "dual"),
      ("mxfp8 dual 1x32 + 32x1", QuantSpec(format="mxfp8"), SQUARE, "dual"),
      ("int8 asym dual 1x128 + 128x1", QuantSpec(format="int8_asym"), SQUARE, "dual")],
     [{}, DUAL_PLAN_H100] + [dict(dual_prefetch=False, dual_prefetch_mx=False)]
     + [dict(dual_slabs=n, dual_slabs_mx_asym=n) for n in (1, 2, 4, 8)]
     + [dict(dual_warps=w, dual_maxnreg=r) for w, r in ((8, 128), (8, None), (4, 128), (16, 64))]
     + [dict(dual_defer=False)] + [dict(dual_column_lanes=lanes) for lanes in ((8, 32), (4, 16), None)]
     + [dict(dual_late_check=False), dict(dual_late_check=False, dual_column_lanes=None)]
     + [dict(dual_l2_prefetch=True), dict(dual_l2_prefetch=True, dual_prefetch=False, dual_prefetch_mx=False),
        dict(dual_row_words=False), dict(dual_prefetch_mx=True)]),
    ([("fp8 e4m3 128x128", CASES[1][1], SQUARE, "quantize"), ("int8 sym 128x128", CASES[10][1], SQUARE, "quantize"),
      ("int8 asym 128x128", QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), SQUARE, "quantize")],
     [{}, dict(one_block_divide=not DEFAULT.one_block_divide)]),
    ([("int8 asym 1x128", CASES[6][1], SQUARE, "quantize")],
     [{}] + [dict(asym_pairs_launch=launch) for launch in ((1024, 1), (4096, 1), (4096, 2), (8192, 4))]
     + [dict(asym_pairs_piece=p) for p in (4, 8, 16, 32, 64) if p != DEFAULT.asym_pairs_piece]
     + [dict(asym_pairs_launch=None, **fields) for fields in
        [{}, dict(asym_defer=False), dict(asym_programs=2, asym_tile=(8192, 8), asym_maxnreg=128)]
        + [dict(asym_tile=tile) for tile in ((1024, 1), (4096, 1), (2048, 2), (4096, 2), (4096, 4), (8192, 8))]]),
]


def _result_bytes(result) -> list:
    """A result as byte tensors: a dequantized tensor (or a delayed quantize's amax), or the codes, scales and
    zero points of a quantize (of both, for the dual layout)."""
    if isinstance(result, torch.Tensor):
        return [result.contiguous().reshape(-1).view(torch.uint8)]
    out = []
    for part in result if isinstance(result, tuple) else (result,):
        out += _result_bytes(part) if isinstance(part, torch.Tensor) else [
            t.contiguous().reshape(-1).view(torch.uint8) for t in part.stored().values()]
    return out


def sweep_configs():
    """x copy of each case under each setting of SWEEPS (prints; picks nothing). Every setting's result
    must be byte-identical to the first setting's (the input has Inf, NaN and subnormal blocks too)."""
    out = []
    for cases, settings in SWEEPS:
        for name, spec, shape, op in cases:
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            x[:7, :5] = torch.tensor([float("inf"), float("nan"), -1e-40, 0.0, -float("inf")])
            _, copy_gbs = time_copy(x)
            qb = op_bytes(x, spec, op)
            qt = quantize(x, spec)  # shipped settings: what dequantize reads
            scale = reference.tensor_scale(reference.amax(x), spec).cpu() if op == "delayed" else None
            first = None
            for setting in settings:
                config = dataclasses.replace(DEFAULT, **setting)
                try:
                    run = {"quantize": lambda: quantize(x, spec, config=config),
                           "delayed": lambda: triton_quantize.quantize_with_amax(x, spec, scale, config=config),
                           "dual": lambda: quantize_dual(x, spec, config=config),
                           "dequantize": lambda: dequantize(qt, torch.bfloat16, config=config)}[op]
                    got = _result_bytes(run())
                    first = got if first is None else first
                    same = len(got) == len(first) and all(torch.equal(a, b) for a, b in zip(got, first))
                    line = f"{name:<30} {op:<10} {setting}: {qb / bench(run) / 1e6 / copy_gbs:.3f} x copy"
                    line += "" if same else "  RESULT DIFFERS FROM THE FIRST SETTING'S"
                except Exception as exc:  # one failing setting must not hide the others
                    line = f"{name:<30} {op} {setting}: failed: {type(exc).__name__}: {exc}"
                print(line, flush=True)
                out.append(line)
    return out


def plot(rows, path, device: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 6))
    names = []
    for r in rows:
        if (r["op"], r["name"]) not in names:
            names.append((r["op"], r["name"]))
    for op, name in names:
        pts = sorted((r["n"] * r["n"] * 2 / 2**20, r["gbs"]) for r in rows if r["op"] == op and r["name"] == name)
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="o", label=f"{op}: {name}" if op != "copy" else name,
                    linestyle="--" if op in ("copy", "bound") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input size (MiB of bf16, square n x n)")
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title(f"quantd quantize/dequantize, {device}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time the settings of SWEEPS")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                    help="n of the n x n inputs (the last also runs the peers)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw quantize_bandwidth.png in --out from a saved "
                    "quantize_bench.json")
    args = ap.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            saved = json.load(f)
        plot(saved["rows"], os.path.join(args.out, "quantize_bandwidth.png"), saved["meta"]["device"])
        return
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=sys.version.split()[0])
    print(meta, flush=True)
    if args.sweep:
        sweep_configs()
    rows = []
    for n in args.sizes[:-1]:
        run_main(n, rows, with_compile=False)
    run_main(args.sizes[-1], rows, with_compile=not args.no_compile)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quantize_bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    try:
        plot(rows, os.path.join(args.out, "quantize_bandwidth.png"), meta["device"])
    except ImportError as e:
        print("no plot:", e)
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print(f"{'n x n bf16':>10} {'op':<10} {'what':<55} {'ms':>8} {'GB/s':>7} {'x copy':>7}")
    for r in rows:
        if r["n"] == args.sizes[-1]:
            print(f"{r['n']:>10} {r['op']:<10} {r['name']:<55} {r['ms']:8.3f} {r['gbs']:7.0f} {r['ratio']:7.3f}")


if __name__ == "__main__":
    main()
