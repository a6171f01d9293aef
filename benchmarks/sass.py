"""Instructions per element of the quantize and dequantize kernels, compiled for sm_90 on a machine without a GPU.

    python benchmarks/sass.py [--shape 16384 16384] [--dump DIR] [--common-path] [--set KEY=VALUE[,KEY=VALUE]]

Compiles `_quantize_kernel` (and `_dequantize_kernel` into bf16) ahead of time (triton.compile with an sm_90
target, the launch geometry of kernels/quantize_plan.py and triton_dequantize.launch_geometry, the
specializations a real launch gets: unit column strides, 16-byte-aligned pointers and rows) and disassembles
it with the cuobjdump that ships with triton.
Prints the static SASS instruction count divided by the elements a thread handles, and the most
frequent opcodes. Static counts include code that normal data never runs (the division's slow path,
the branch a program takes when its amax meets an Inf or NaN); --common-path compiles a copy of the
module without those branches, which is what a program of finite values under ordinary scales runs.
Persistent programs (one block a program, INT8 asym) are counted over their whole loop, prologue
included, per element of one tile.
The triton that compiles is the one imported: to see what the device's triton builds, put its wheel first on the
path (`pip install --no-deps --target DIR triton==3.6.0`, then `PYTHONPATH=DIR python benchmarks/sass.py`). The
versions differ: triton 3.9 gave INT8 asym's 2048-element program 96 registers a thread, 3.6 237 (ncu on an H200
agreed with 3.6).
Counts say nothing of latency or registers, so they are a proxy to compare variants of one kernel,
not a model: on an H100 (BENCHMARKS.md), common path, E4M3 1x128 at ~14-15 ran at 1.02 x copy and INT8
sym at ~22 at 0.99, while an INT8 sym variant at ~18 ran at 0.92 because it needed 167 registers a
thread instead of 127. The GPU's own timings decide.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess

import torch
import triton
from triton.backends.compiler import GPUTarget

from profile_kernels import parse_config
from quantd.kernels import triton_dequantize as td
from quantd.kernels import triton_asym_pairs as asym
from quantd.kernels import triton_delayed_words as words
from quantd.kernels import triton_mxfp4_pairs as pairs
from quantd.kernels import triton_nvfp4 as nvfp4
from quantd.kernels import triton_quantize as tq
from quantd.kernels.config import DEFAULT, KernelConfig
from quantd.kernels.quantize_plan import block_geometry, element_constants, schedule, tile_geometry
from quantd.kernels.spec import E2M1, Format, QuantSpec, ScaleEncoding

SPECS = [
    ("fp8 e4m3 1x128", QuantSpec()),
    ("fp8 e4m3 1x128 pow2", QuantSpec(scale_encoding="pow2")),
    ("fp8 e4m3 128x128", QuantSpec(granularity="tile", tile=(128, 128))),
    ("mxfp8", QuantSpec(format="mxfp8")),
    ("mxfp4", QuantSpec(format="mxfp4")),
    ("int8 sym 1x128", QuantSpec(format="int8_sym")),
    ("int8 asym 1x128", QuantSpec(format="int8_asym")),
    ("int8 asym 128x128", QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128))),
    ("int8 sym channel0", QuantSpec(format="int8_sym", granularity="channel", axis=0)),
    ("fp8 e4m3 channel0", QuantSpec(granularity="channel", axis=0)),
]
DEQUANTIZE_SPECS = [("fp8 e4m3 1x128", QuantSpec()), ("int8 asym 1x128", QuantSpec(format="int8_asym")),
                    ("mxfp4", QuantSpec(format="mxfp4")), ("nvfp4", QuantSpec(format="nvfp4"))]
POINTER_TYPES = {torch.float32: "*fp32", torch.uint8: "*u8"}


def compile_quantize(spec: QuantSpec, shape, dtype: str = "bf16", source=None, dual: bool = False,
                     ones: tuple = ()):
    """(compiled kernel, elements a thread handles) of the quantize launch of `spec`: scales reduced in
    registers (source None), or read from the statistics pass or given (tq.SCALE_STATS, SCALE_GIVEN_AMAX);
    dual: quantize_dual's launch (1 x g groups of X and of X^T); ones: integer arguments specialized as the
    constant 1, as a launch specializes them (a transposed input's row stride, a single row)."""
    (_, rows, cols), (br, bc) = block_geometry(shape, spec)
    register = source is None
    fmt = element_constants(spec, exact_fp8=False, guarded=DEFAULT.guarded_quotient,
                            tile_divide=DEFAULT.one_block_divide)
    tile, warps = tq.dual_geometry(cols, bc, DEFAULT) if dual else \
        tile_geometry(br, bc, rows, cols, register, DEFAULT, asym=fmt.ASYM, amax=source is tq.SCALE_GIVEN_AMAX)
    run = schedule(tile, warps, register, dual, fmt.ASYM, fmt.IS_INT, DEFAULT)
    source = tq.SCALE_REGISTER if register else source
    constexprs = dict(TILE=tile, FMT=fmt, SCALE_SRC=source.value, BID_ROWS=rows > br, BID_COLS=cols > bc, DUAL=dual,
                      PACK4=spec.element.bits == 4, BF16_BITS=False, sx_c=1, ss_c=1, TILE_MODE=tq.tile_mode(run),
                      STAGES=run.stages, FIXUP=False, SCALES_EACH=1,
                      DUAL_PLAN=tq.dual_plan(spec, DEFAULT, rows, dual),
                      **({"sst_c": 1} if dual else {}), **{name: 1 for name in ones})
    names = tq._quantize_kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "x_ptr":
            signature[name] = f"*{dtype}"
        elif name == "stats_ptr" and run.defer:  # the deferred tiles' list
            signature[name] = "*i32"
        elif name in ("stats_ptr", "given_ptr") and not register:
            signature[name] = "*fp32"
        elif name in ("scales_ptr", "scales_t_ptr"):
            signature[name] = POINTER_TYPES[torch.float32 if spec.scale_dtype == torch.float32 else torch.uint8]
        elif name.endswith("_ptr"):
            signature[name] = "*u8"
        else:
            signature[name] = "i32"
    kernel = compile_sm90(tq._quantize_kernel, signature, constexprs,
                          {"R", "C", "sx_p", "sx_r", "sq_p", "sq_r"} - set(ones), run.warps, run.maxnreg)
    return kernel, tile.elems / (run.warps * 32)


def compile_nvfp4():
    """(compiled kernel, elements a thread handles) of the NVFP4 kernel on bf16 input."""
    fn = nvfp4._nvfp4_kernel
    rows, groups, warps = DEFAULT.nvfp4_launch
    constexprs = dict(ROWS=rows, GROUPS=groups, SCALE_FMT=nvfp4.E4M3_HW,
                      BF16_BITS=False, WORDS=nvfp4.BF16_WORDS.value, FROM_AMAX=False, AMAX=False,
                      PACKED=DEFAULT.packed_encode, ROWS_X=False, sx_c=1)  # ss_c: not specialized
    scalars = ("source_ptr", "ts_ptr", "amax_ptr")
    signature = {n: "constexpr" if n in constexprs else "*i32" if n == "x_ptr" else "*fp32" if n in scalars
                 else "*u8" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    kernel = compile_sm90(fn, signature, constexprs, {"C", "sx_r", "sq_r", "ss_r"}, warps, DEFAULT.nvfp4_maxnreg)
    return kernel, rows * groups * 16 / (warps * 32)


def compile_delayed_words():
    """(compiled kernel, elements a thread handles) of delayed scaling from bf16 words (E4M3, per tensor), at
    KernelConfig.delayed_words or, where that is None, at the field's default."""
    fn = words._delayed_words_kernel
    rows, width, warps = DEFAULT.delayed_words or KernelConfig.delayed_words
    fmt = element_constants(QuantSpec(granularity="tensor"), exact_fp8=False, guarded=DEFAULT.guarded_quotient)
    constexprs = dict(ROWS=rows, WIDTH=width, CHUNK=words.careful_chunk(width, warps), FMT=fmt, PACKED=True,
                      ROWS_X=False)
    signature = {n: "constexpr" if n in constexprs else "*i32" if n == "w_ptr" else "*i16" if n == "codes_ptr"
                 else "*fp32" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    kernel = compile_sm90(fn, signature, constexprs, {"C2", "sw_r"}, warps)
    return kernel, rows * width * 2 / (warps * 32)


def compile_mxfp4_pairs():
    """(compiled kernel, elements a thread handles) of the MXFP4 pairs kernel on bf16 input."""
    fn = pairs._mxfp4_pairs_kernel
    rows, groups, warps = DEFAULT.mxfp4_pairs_launch
    constexprs = dict(ROWS=rows, GROUPS=groups, FP16=False,
                      FMT=element_constants(QuantSpec(format="mxfp4")), ss_c=1, PACKED=True, ROWS_X=False)
    signature = {n: "constexpr" if n in constexprs else "*i32" if n == "w_ptr" else "*u8" if n.endswith("_ptr")
                 else "i32" for n in fn.arg_names}
    kernel = compile_sm90(fn, signature, constexprs, {"C2", "sw_r"}, warps)
    return kernel, rows * groups * 32 / (warps * 32)


def compile_asym_pairs(block_rows: int = 1):
    """(compiled kernel, elements a thread handles) of the INT8 asym pairs kernel on bf16 1 x 128 groups
    (block_rows 1) or block_rows x 128 tiles (a tile a program, as triton_asym_pairs.asym_pairs launches them; 64
    elements a thread where KernelConfig.asym_pairs_tile_elems is None)."""
    fn = asym._asym_pairs_kernel
    config = dataclasses.replace(DEFAULT, asym_pairs_tile_elems=DEFAULT.asym_pairs_tile_elems or 64)
    rows, groups, warps = asym.launch_geometry(block_rows, 128, 128, config)  # rows of 128 blocks
    constexprs = dict(ROWS=rows, GROUPS=groups, WORDS=64, PIECE=min(64, DEFAULT.asym_pairs_piece),
                      FMT=element_constants(QuantSpec(format="int8_asym")), ss_c=1, ROWS_X=False,
                      BLOCK_ROWS=block_rows)
    signature = {n: "constexpr" if n in constexprs else "*i32" if n == "w_ptr" else "*i16" if n == "codes_ptr"
                 else "*fp32" if n == "scales_ptr" else "*u8" if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    kernel = compile_sm90(fn, signature, constexprs, {"C2", "sw_r"}, warps)
    return kernel, rows * groups * 128 / (warps * 32)


def compile_dequantize(spec: QuantSpec, shape, out_dtype: torch.dtype = torch.bfloat16):
    """(compiled kernel, elements a thread handles) of the compiled dequantize launch of `spec` into `out_dtype`
    (the choices triton_dequantize._dequantize_into makes for a word-aligned output; codes widened by the
    hardware)."""
    el = spec.element
    (_, rows, cols), (br, bc) = block_geometry(shape, spec)
    tile, blocked, split, warps = td.launch_geometry(el, rows, cols, br, bc, DEFAULT)
    fp4 = el is E2M1
    pow2, nv, asym = (spec.scale_encoding == ScaleEncoding.POW2, spec.format == Format.NVFP4,
                      spec.format == Format.INT8_ASYM)
    words = fp4 and out_dtype in (torch.bfloat16, torch.float16) and DEFAULT.packed_decode
    constexprs = dict(TILE=tile, BLOCKED=blocked, BID_ROWS=rows > br, BID_COLS=cols > bc, UNPACK4=fp4, SPLIT=split,
                      NV=nv, DECODE_BITS=fp4, POW2=pow2, ASYM=asym, NBITS=el.bits, EBITS=el.ebits, MBITS=el.mbits,
                      BIAS=el.bias, SPECIALS=td._specials(el), BF16_BITS=False, WORDS=words,
                      F16=out_dtype == torch.float16, HW_SCALES=nv)
    scale_type = "*u8" if pow2 or nv else "*fp32"
    pointers = {
        "codes_ptr": "*u8" if fp4 else {torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5",
                                        torch.int8: "*i8"}[spec.code_dtype],
        "out_ptr": "*i32" if words else {torch.bfloat16: "*bf16", torch.float16: "*fp16",
                                         torch.float32: "*fp32"}[out_dtype],
        "scales_ptr": scale_type, "zp_ptr": "*i8" if asym else scale_type, "ts_ptr": "*fp32"}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in td._dequantize_kernel.arg_names}
    kernel = compile_sm90(td._dequantize_kernel, signature, constexprs, {"R", "C", "sq_p", "sq_r"}, warps)
    return kernel, tile.elems / (warps * 32)


def compile_sm90(fn, signature: dict, constexprs: dict, aligned: set, warps: int, maxnreg: int | None = None,
                 stages: int | None = None):
    """triton.compile of jit function `fn` for sm_90, its pointers and the `aligned` integer arguments
    specialized as 16-byte aligned, as a real launch specializes them (stages: num_stages, if set)."""
    names = fn.arg_names
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") or n in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, attrs=attrs,
                                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    if stages is not None:
        options["num_stages"] = stages
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def cuobjdump(*args, check: bool = True) -> str:
    """stdout of the cuobjdump that ships with triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=check).stdout


def sass_of(kernel, path: str) -> str:
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    return cuobjdump("-sass", path)


def resources(path: str) -> str:
    """Registers a thread, spill stores and shared memory of a cubin, as cuobjdump -res-usage reports them."""
    out = cuobjdump("-res-usage", path)
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return f"{found.get('REG', '?')} regs, stack {found.get('STACK', '?')}, shared {found.get('SHARED', '?')}"


# An instruction line of a cuobjdump listing: (opcode with its modifiers, operands).
INSTRUCTION = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9._]*)\s*([^;]*);")


def stray_merges(sass: str) -> list:
    """The F2FP ...MERGE_C instructions of a cuobjdump listing (two fp32 converted into the lower half of a register,
    the upper half taken from register C's lower half) whose C was last written, in listing order, by anything but a
    conversion that merged nothing. That is the signature of a ptxas miscompile (CUDA 12.8 and 12.9, seen with triton
    3.6's PTX: BENCHMARKS.md, 2026-12-06 11:19 UTC): a thread's last code pair (cvt.rn.satfinite.e4m3x2.f32, then
    shr.u16 of the pair and mov.b32 of both halves) merged `(R & 0xffff) >> 8` of a wrong register R, the stack
    pointer or a live quotient, instead of its own conversion. Every shipped kernel has none."""
    last, out = {}, []
    for line in sass.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        op, operands = m.group(1), [o.strip().removesuffix(".reuse") for o in m.group(2).split(",")]
        if op.startswith("F2FP") and "MERGE_C" in op and operands[3] != "RZ":
            writer = last.get(operands[3])
            if writer is None or not (writer[0].startswith("F2FP") and writer[1][3] == "RZ"):
                out.append(f"{op} {m.group(2).strip()}")
        if re.fullmatch(r"R\d+", operands[0]):
            last[operands[0]] = (op, operands)
            if ".WIDE" in op or ".64" in op:  # a register pair
                last[f"R{int(operands[0][1:]) + 1}"] = (op, operands)
    return out


def opcodes(sass: str) -> list:
    """Opcodes of the instructions in a cuobjdump listing (predicates and modifiers dropped)."""
    return [m.group(1).split(".")[0] for m in map(INSTRUCTION.match, sass.splitlines()) if m]


# The rare branches of the quantize kernels and what --common-path puts in their place.
CAREFUL_TILES = [("careful != 0", "False"), ("careful == 0", "True")]
GUARDED_SCALES = [("if tl.max(((scale < CORRECTED_MIN) | (scale > CORRECTED_MAX)).to(tl.int32)) == 0:", "if True:")]
RARE_BRANCHES = {"triton_quantize": CAREFUL_TILES + GUARDED_SCALES, "triton_mxfp4_pairs": CAREFUL_TILES,
                 "triton_asym_pairs": CAREFUL_TILES[1:],
                 "triton_nvfp4": [("if fast:", "if True:")],
                 "triton_delayed_words": [("if mag < 0x7F80:", "if True:"), ("if careless:", "if True:")]}


def common_path_module(module, folder: str):
    """A copy of kernel module `module` (kernels/triton_quantize.py, triton_mxfp4_pairs.py, triton_nvfp4.py) without
    its rare branches, imported from `folder`."""
    src = inspect.getsource(module)
    name = module.__name__.rsplit(".", 1)[1]
    for old, new in RARE_BRANCHES[name]:
        if old not in src:
            raise SystemExit(f"sass.py --common-path: no {old!r} in {name}.py")
        src = src.replace(old, new)
    path = os.path.join(folder, f"{name}_common_path.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"quantd.kernels.{name}_common_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    global tq, pairs, asym, nvfp4, words, DEFAULT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs="+", default=[16384, 16384])
    ap.add_argument("--dump", default="/tmp/quantd-sass", help="folder for the cubins and SASS listings")
    ap.add_argument("--common-path", action="store_true",
                    help="count a copy of the kernels without the branches for Inf/NaN and extreme scales")
    ap.add_argument("--only", default="", metavar="REGEX", help="only the kernels whose names match")
    ap.add_argument("--set", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="KernelConfig fields replaced (Python literals, as profile_kernels.py --set)")
    args = ap.parse_args()
    if args.set:
        DEFAULT = dataclasses.replace(DEFAULT, **parse_config(args.set))
    os.makedirs(args.dump, exist_ok=True)
    if args.common_path:
        tq, pairs, asym, nvfp4, words = (common_path_module(m, args.dump) for m in (tq, pairs, asym, nvfp4, words))
    print(f"triton {triton.__version__}, sm_90, input bf16 {args.shape}{', common path' if args.common_path else ''}")
    builds = [(name, lambda spec=spec: compile_quantize(spec, args.shape)) for name, spec in SPECS]
    builds.append(("mxfp4, pairs kernel", compile_mxfp4_pairs))
    builds.append(("int8 asym 1x128, pairs kernel", compile_asym_pairs))
    builds.append(("int8 asym 128x128, pairs kernel", lambda: compile_asym_pairs(128)))
    builds.append(("nvfp4", compile_nvfp4))
    tensor = QuantSpec(granularity="tensor")
    builds.append(("fp8 e4m3 tensor, 2nd pass", lambda: compile_quantize(tensor, args.shape, source=tq.SCALE_STATS)))
    builds.append(("fp8 e4m3 tensor, delayed", lambda: compile_quantize(tensor, args.shape, source=tq.SCALE_GIVEN_AMAX)))
    builds.append(("fp8 e4m3 tensor, delayed words", compile_delayed_words))
    builds.append(("fp8 e4m3 dual 1x128", lambda: compile_quantize(QuantSpec(), args.shape, dual=True)))
    # R, sx_r and sq_r specialized as 1, as launches of one row, a transposed input or one column get them.
    builds.append(("fp8 e4m3 dual 1x128, unit strides",
                   lambda: compile_quantize(QuantSpec(), args.shape, dual=True, ones=("R", "sx_r", "sq_r"))))
    for name, spec in DEQUANTIZE_SPECS:
        builds.append((f"dequantize {name}", lambda spec=spec: compile_dequantize(spec, args.shape)))
    for name, build in builds:
        if not re.search(args.only, name):
            continue
        kernel, per_thread = build()
        stem = os.path.join(args.dump, re.sub(r"\W+", "_", name))
        sass = sass_of(kernel, stem + ".cubin")
        with open(stem + ".sass", "w") as f:
            f.write(sass)
        ops = opcodes(sass)
        top = ", ".join(f"{op} {n / per_thread:.1f}" for op, n in collections.Counter(ops).most_common(8))
        print(f"{name:22s} {len(ops) / per_thread:5.1f} instructions/element ({per_thread:.0f} a thread, "
              f"{kernel.metadata.num_warps} warps, {resources(stem + '.cubin')}, {len(stray_merges(sass))} stray merges)"
              f"   {top}")


if __name__ == "__main__":
    main()
