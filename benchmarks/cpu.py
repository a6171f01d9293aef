"""CPU backend throughput: quantd's compiled backend vs the eager reference vs a plain torch.compile.

    python benchmarks/cpu.py [--size 4096] [--repeat 20] [--markdown]

Throughput counts the bytes read and written (input + codes + scales, + zero points),
over the best and the median of `repeat` timed calls after warm-up (on a shared machine the
best is the one other processes disturbed least). Compile time is the first call.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from quantd.kernels import cpu, reference
from quantd.kernels.spec import QuantSpec

SPECS = [
    QuantSpec("fp8_e4m3"),  # 1x128, the headline
    QuantSpec("fp8_e4m3", "tile", tile=(128, 128)),
    QuantSpec("fp8_e5m2", "tensor"),
    QuantSpec("int8_sym", "channel", axis=0),
    QuantSpec("int8_asym"),
    QuantSpec("mxfp8"),
    QuantSpec("mxfp4"),
]


def simple_quantizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A minimal 1x128 E4M3 quantizer (no NaN/Inf handling): what a plain torch.compile gives."""
    b = x.reshape(-1, 128).float()
    amax = b.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, 1.0)
    return torch.clamp(b / scale, -448.0, 448.0).to(torch.float8_e4m3fn), scale


def nbytes(x: torch.Tensor, qt_or_tuple) -> int:
    parts = list(qt_or_tuple.stored().values()) if hasattr(qt_or_tuple, "codes") else qt_or_tuple
    return x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in parts if t is not None)


def timed(fn, x, repeat: int):
    t0 = time.perf_counter()
    out = fn(x)
    first = time.perf_counter() - t0
    fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return out, first, min(times), statistics.median(times)


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the input is size x size bf16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--eager-repeat", type=int, default=3, help="repeats of the (slow) eager reference")
    ap.add_argument("--markdown", action="store_true", help="print a BENCHMARKS.md section")
    args = ap.parse_args()
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).bfloat16()
    rows = []  # (what, best GB/s, median GB/s, eager reference best GB/s or None, best ms, first call s)
    for spec in SPECS:
        qt, first, best, med = timed(lambda v, s=spec: cpu.quantize(v, s), x, args.repeat)
        _, _, ref, _ = timed(lambda v, s=spec: reference.quantize(v, s), x, args.eager_repeat)
        gb = nbytes(x, qt) / 1e9
        rows.append((spec.describe(), gb / best, gb / med, gb / ref, best * 1e3, first))
    plain = torch.compile(simple_quantizer, dynamic=False)
    out, first, best, med = timed(plain, x, args.repeat)
    gb = nbytes(x, out) / 1e9
    rows.append(("plain torch.compile, 1x128 E4M3 (no NaN/Inf handling)", gb / best, gb / med, None, best * 1e3, first))
    for spec in SPECS:
        qt = cpu.quantize(x, spec)
        _, first, best, med = timed(lambda v, q=qt: cpu.dequantize(q), x, args.repeat)
        _, _, ref, _ = timed(lambda v, q=qt: reference.dequantize(q), x, args.eager_repeat)
        gb = nbytes(x, qt) / 1e9
        rows.append((f"dequantize {spec.describe()} -> bf16", gb / best, gb / med, gb / ref, best * 1e3, first))

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    header = f"{args.size}x{args.size} bf16 input, {when}, {machine()}, {versions}, load average {load}"
    if args.markdown:
        print(f"Input: {header}. GB/s = (bytes in + bytes out) / time of the best (median) of {args.repeat} calls; "
              f"`python benchmarks/cpu.py --markdown`.\n")
        print("| what | GB/s best | GB/s median | eager reference GB/s | ms best | first call (compile) s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, best, med, ref, ms, first in rows:
            print(f"| {name} | {best:.2f} | {med:.2f} | {'' if ref is None else f'{ref:.2f}'} | {ms:.1f} | {first:.1f} |")
    else:
        print(header)
        for name, best, med, ref, ms, first in rows:
            print(f"{name:56s} {best:6.2f} GB/s best {med:6.2f} median (eager {'-' if ref is None else f'{ref:.2f}'})"
                  f"  {ms:7.1f} ms  first {first:.1f} s")


if __name__ == "__main__":
    main()
