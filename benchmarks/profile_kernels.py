"""Launch each quantize / dequantize case once, after a warm-up, for a profiler to read (or time them).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:'quantize|stats|nvfp4|mxfp4|dequant' python3 benchmarks/profile_kernels.py [--n 8192] [CASE ...]
    python3 benchmarks/profile_kernels.py --time [--set guarded_quotient=True --set stats_warps=8,stats_programs=1024 ...]
        [CASE ...]
    python3 benchmarks/profile_kernels.py --time --sms 96 [CASE ...]    # on 96 of the GPU's SMs (restrict_sms)

CASE names a row of CASES (all by default). Each --set KEY=VALUE[,KEY=VALUE] is a configuration (KernelConfig fields
replaced by Python literals) every case runs under, in one process. --time prints each case's median ms and x copy
(benchmarks/quantize.py's byte counts) instead of launching it once; both ways check each configuration's results
against the shipped one's.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import time

import torch

from quantize import _result_bytes, bench, op_bytes, time_copy
from quantd.kernels import launch, reference, triton_block_stats, triton_quantize
from quantd.kernels.config import DEFAULT
from quantd.kernels.quantize_plan import block_view
from quantd.kernels.spec import QuantSpec
from quantd.kernels.triton_dequantize import dequantize

TENSOR = QuantSpec(granularity="tensor")


def _stats_only(x, spec, config):
    v, (br, bc) = block_view(x, spec)
    return lambda: triton_block_stats.block_stats(v, br, bc, 1, 1, False, config)


def _scale(x, spec, where):
    """The tensor's own per-tensor scale, on the host ("cpu", "pinned": in page-locked memory) or on a device."""
    scale = reference.tensor_scale(reference.amax(x), spec)
    return scale.cpu().pin_memory() if where == "pinned" else scale.to(where)


def _given(x, spec, config, where="cpu"):  # scales on the host, as a request carries them
    scale = _scale(x, spec, where)
    return lambda: triton_quantize.quantize(x, spec, scale, config=config)


def _delayed(x, spec, config, where="cpu"):
    scale = _scale(x, spec, where)
    return lambda: triton_quantize.quantize_with_amax(x, spec, scale, config=config)


CASES = {  # name: (spec, op, how)
    "e4m3_1x128": (QuantSpec(), "quantize", None),
    "e4m3_1x128_pow2": (QuantSpec(scale_encoding="pow2"), "quantize", None),
    "mxfp8": (QuantSpec(format="mxfp8"), "quantize", None),
    "e4m3_128x128": (QuantSpec(granularity="tile", tile=(128, 128)), "quantize", None),
    "e4m3_channel": (QuantSpec(granularity="channel", axis=0), "quantize", None),
    "int8_sym_channel": (QuantSpec(format="int8_sym", granularity="channel", axis=0), "quantize", None),
    "int8_sym_128x128": (QuantSpec(format="int8_sym", granularity="tile", tile=(128, 128)), "quantize", None),
    "int8_asym_128x128": (QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), "quantize", None),
    "mxfp4": (QuantSpec(format="mxfp4"), "quantize", None),
    "int8_sym": (QuantSpec(format="int8_sym"), "quantize", None),
    "int8_asym": (QuantSpec(format="int8_asym"), "quantize", None),
    "tensor": (TENSOR, "quantize", None),
    "tensor_stats": (TENSOR, "stats", _stats_only),
    "torch_amax": (TENSOR, "stats", lambda x, spec, config: lambda: torch.amax(x)),  # a read-only peer
    "tensor_given": (TENSOR, "quantize", _given),
    "tensor_delayed": (TENSOR, "quantize", _delayed),
    "tensor_delayed_gpu_scale": (TENSOR, "quantize", lambda x, spec, config: _delayed(x, spec, config, x.device)),
    "tensor_delayed_pinned": (TENSOR, "quantize", lambda x, spec, config: _delayed(x, spec, config, "pinned")),
    "nvfp4": (QuantSpec(format="nvfp4"), "quantize", None),
    "nvfp4_given": (QuantSpec(format="nvfp4"), "quantize", _given),
    "nvfp4_delayed": (QuantSpec(format="nvfp4"), "quantize", _delayed),
    "dual": (QuantSpec(), "dual", None),
    "dual_int8_asym": (QuantSpec(format="int8_asym"), "dual", None),
    "dual_mxfp8": (QuantSpec(format="mxfp8"), "dual", None),
    "mxfp4_deq": (QuantSpec(format="mxfp4"), "dequantize", None),
    "nvfp4_deq": (QuantSpec(format="nvfp4"), "dequantize", None),
    "e4m3_deq": (QuantSpec(), "dequantize", None),
    "e4m3_128x128_deq": (QuantSpec(granularity="tile", tile=(128, 128)), "dequantize", None),
    "mxfp8_deq": (QuantSpec(format="mxfp8"), "dequantize", None),
    "int8_sym_deq": (QuantSpec(format="int8_sym"), "dequantize", None),
    "int8_asym_deq": (QuantSpec(format="int8_asym"), "dequantize", None),
    "int8_sym_channel_deq": (QuantSpec(format="int8_sym", granularity="channel", axis=0), "dequantize", None),
}


def runner(x, name, config):
    spec, op, how = CASES[name]
    if how is not None:
        return how(x, spec, config)
    if op == "dual":
        return lambda: triton_quantize.quantize_dual(x, spec, config=config)
    if op == "dequantize":
        qt = triton_quantize.quantize(x, spec)
        return lambda: dequantize(qt, torch.bfloat16, config=config)
    return lambda: triton_quantize.quantize(x, spec, config=config)


def restrict_sms(n: int) -> None:
    """Run this process's kernels on n of the GPU's SMs, in a CUDA green context made current before any kernel
    loads, with the kernels' launch geometry (launch.sm_count) sized for n: an H100 on 96 of its 132 SMs has about
    an H200's memory bandwidth an SM (4,160 / 132 GB/s against 2,960 / 96), to stand in for the H200's SM-bound
    rankings (BENCHMARKS.md)."""
    from torch.cuda.green_contexts import GreenContext
    device = torch.cuda.current_device()
    torch.zeros(1, device=device)  # the primary context, which a green context needs first
    try:
        context = GreenContext.create(num_sms=n, device_id=device)
    except TypeError:  # a binding of positional arguments only (before torch 2.12)
        context = GreenContext.create(n, device)
    context.set_context()
    restrict_sms.context = context  # alive for the process: a collected green context is destroyed
    real = launch._device_properties(device)

    class Restricted:
        multi_processor_count = n

        def __getattr__(self, name):
            return getattr(real, name)

    launch._device_properties = lambda index: Restricted()


def parse_config(text: str) -> dict:
    """KEY=VALUE,KEY=VALUE (Python literals; a tuple in parentheses keeps its commas) -> KernelConfig changes.
    A tuple for a field whose default is a dataclass (OneBlock) gives that dataclass's fields in order."""
    parts = re.split(r",(?![^()]*\))", text)
    changes = {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in parts if p)}
    for k, v in changes.items():
        default = getattr(DEFAULT, k)
        if dataclasses.is_dataclass(default) and isinstance(v, tuple):
            changes[k] = type(default)(*v)
    return changes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=list(CASES))
    ap.add_argument("--n", type=int, default=8192, help="n of the n x n bf16 input")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a check under TRITON_INTERPRET=1 (no --time)")
    ap.add_argument("--plain", action="store_true", help="no Inf, NaN or subnormal in the input (as quantize.py's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="a configuration to run the cases under (repeatable; none: the shipped one)")
    ap.add_argument("--sms", type=int, help="run on this many of the GPU's SMs (a green context; restrict_sms)")
    args = ap.parse_args()
    if args.sms:
        restrict_sms(args.sms)
    variants = [parse_config(text) for text in args.set] or [{}]
    x = torch.randn(args.n, args.n, device=args.device, dtype=torch.bfloat16) * 3
    if not args.plain:
        x[:7, :5] = torch.tensor([float("inf"), float("nan"), -1e-40, 0.0, -float("inf")])
    copy_gbs = time_copy(x)[1] if args.time else None
    if args.time:
        sms = launch.sm_count(x.device)
        print(f"copy {copy_gbs:.0f} GB/s on {torch.cuda.get_device_name()}, {sms} SMs", flush=True)
    for name in args.cases:
        want = None
        for changes in variants:
            run = runner(x, name, dataclasses.replace(DEFAULT, **changes))
            got = run()
            if changes:
                want = want or _result_bytes(runner(x, name, DEFAULT)())
                if not all(torch.equal(a, b) for a, b in zip(_result_bytes(got), want)):
                    print(f"{name} {changes}: RESULT DIFFERS FROM THE SHIPPED CONFIG", flush=True)
            if args.time:
                spec, op, _ = CASES[name]
                nbytes = x.numel() * 2 if op == "stats" else op_bytes(x, spec, op)
                ms = bench(run)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(20):
                    run()
                host_ms = (time.perf_counter() - start) / 20 * 1e3  # the host's time a call, while the GPU queue fills
                print(f"{name:<16} {ms:8.4f} ms {nbytes / ms / 1e6 / copy_gbs:6.3f} x copy  (host {host_ms:.3f} ms a call) "
                      f"{changes or ''}", flush=True)
            else:
                run()
    if args.device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
