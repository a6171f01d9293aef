"""Compile kernels/gluon_gemm.py for sm_90 on a machine without a GPU and report what ptxas made of it.

    python benchmarks/gluon_gemm_sass.py [--dump DIR] [--only REGEX]

For each launch variant in gluon_gemm.CONFIGS, in both modes of the kernel (block-scaled: A 1x128 x B
128x128 scales; per-tensor: one scale for A and one for B, constant along K), and for the E5M2 x E4M3
block-scaled product, the E4M3 x E5M2 per-row one (A and B one scale a row) and both recipes split over two
work items a tile (SPLIT = 2) with the default variant, and (triton 3.9 on) the block-scaled E4M3 product over pairs
of CTAs (gluon_gemm.PAIR, num_ctas 2: its multicast copies of B and the remote arrives on the pair's barrier are
counted in the PTX): triton.compile of the Gluon kernel with the specializations a real launch of contiguous
operands gets (16-byte aligned pointers and C rows, unit inner strides of C and of row-major scales,
zero strides of single scales), then
  * registers, spills, shared memory (cuobjdump -res-usage, and the log of triton's own ptxas -v run, whose
    warnings also say whether ptxas serialized the wgmma pipeline; every variant is compiled afresh for it);
  * the setmaxnreg split between the partitions;
  * HGMMA / WARPGROUP.DEPBAR counts in the SASS, the wgmma forms (operand types) and wgmma.wait_group
    depths in the PTX (wait_group 1 inside the K loop means block k+1's MMA stays in flight while block k
    is promoted), and the promotions: fma.rn.f32 (block-scaled) or add.rn.f32 (scales constant along K).
Like benchmarks/sass.py, static counts are evidence of the schedule, not of speed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import sys

# triton runs ptxas with -v; its log (registers, spills, wgmma serialization) is printed only by a compile that runs
# ptxas, so none comes from the cache
os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from quantd.kernels import gluon_gemm  # noqa: E402
from sass import cuobjdump  # noqa: E402


# (mode, A codes, B codes): block-scaled, per-tensor (sa and sb one scale each) or per-row (one a row of A
# and of B); the first two with every launch variant, the others with the default (CONFIGS[0]). "split" modes:
# the same kernel with its K blocks split over two work items a tile (SPLIT = 2), fp32 partials out.
MODES = [("block-scaled", "fp8e4nv", "fp8e4nv"), ("per-tensor", "fp8e4nv", "fp8e4nv")]
DEFAULT_ONLY = [("block-scaled", "fp8e5", "fp8e4nv"), ("per-row", "fp8e4nv", "fp8e5"),
                ("block-scaled split", "fp8e4nv", "fp8e4nv"), ("per-row split", "fp8e4nv", "fp8e4nv")]
GL_DTYPES = {"fp8e4nv": "float8e4nv", "fp8e5": "float8e5"}


def variants(gg) -> list:
    return [(mode, a, b, cfg) for mode, a, b in MODES for cfg in gg.CONFIGS] + [
        (mode, a, b, gg.CONFIGS[0]) for mode, a, b in DEFAULT_ONLY] + (
        [(*MODES[0], gg.PAIR)] if gg.CLUSTER_AVAILABLE else [])


def compile_variant(gg, cfg, out: str = "bf16", mode: str = "block-scaled", a_dtype: str = "fp8e4nv",
                    b_dtype: str = "fp8e4nv"):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = gg._fp8_gemm_kernel

    def desc(dtype, rows, cga=None):
        extra = {} if cga is None else {"cga_layout": cga}  # a pair of CTAs: rows split, or the block in each
        layout = gl.NVMMASharedLayout.get_default_for([rows, gg.K_BLOCK], getattr(gl, GL_DTYPES[dtype]), **extra)
        return f"tensordesc<{dtype}[{rows}, {gg.K_BLOCK}],{layout!r}>"

    split = mode.endswith(" split")
    mode = mode.removesuffix(" split")
    constexprs = dict(STAGES=cfg.stages, GROUP_M=cfg.group_m, CHAIN=cfg.chain, CONSUMER_REGS=cfg.consumer_regs,
                      PRODUCER_REGS=cfg.producer_regs, SCALE_PER_K=mode == "block-scaled", SPLIT=2 if split else 1,
                      WGS=cfg.warpgroups, CLUSTER=cfg.cluster,
                      stride_cn=1)
    aligned = {"c_ptr", "sa_ptr", "sb_ptr", "ws_ptr", "stride_cm", "M", "N", "K"}  # as M = N = K = 4096
    if mode == "block-scaled":  # row-major (M, K/128) and (N/128, K/128) scales
        constexprs.update(stride_sak=1, stride_sbk=1)
        aligned |= {"stride_sam", "stride_sbn"}
    elif mode == "per-tensor":  # every scale stride 0 (0 is divisible by 16)
        aligned |= {"stride_sam", "stride_sak", "stride_sbn", "stride_sbk"}
    else:  # per-row: (M,) and (N,) contiguous, K strides 0
        constexprs.update(stride_sam=1, stride_sbn=1)
        aligned |= {"stride_sak", "stride_sbk"}
    (a_rows, a_cga), (b_rows, b_cga) = gg.operand_blocks(cfg)  # the blocks _launch gives the kernel
    types = dict(a_desc=desc(a_dtype, a_rows, a_cga), b_desc=desc(b_dtype, b_rows, b_cga),
                 c_ptr=f"*{out}",
                 sa_ptr="*fp32", sb_ptr="*fp32",
                 ws_ptr="*fp32")
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i, ): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    src = GluonASTSource(fn=fn, signature=signature, attrs=attrs,
                         constexprs={(names.index(k), ): v for k, v in constexprs.items()})
    options = {"num_warps": 4, "maxnreg": cfg.maxnreg, "num_ctas": cfg.cluster}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def wait_depths(ptx: str) -> list:
    """wgmma.wait_group depths in PTX order (1: the newest MMA stays in flight while older ones are read)."""
    return [int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default="/tmp/quantd-gluon-sass")
    ap.add_argument("--out", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--only", default="", metavar="REGEX", help="only the variants whose labels match")
    args = ap.parse_args()
    os.makedirs(args.dump, exist_ok=True)
    gg = gluon_gemm
    if not gg.AVAILABLE:
        sys.exit(gg.UNAVAILABLE_REASON)
    print(f"triton {triton.__version__}, sm_90, out {args.out}")
    for mode, a_dtype, b_dtype, cfg in variants(gg):
        label = f"{mode} {a_dtype} x {b_dtype} | {cfg!r}"
        if not re.search(args.only, label):
            continue
        name = re.sub(r"\W+", "_", repr(cfg))
        if (mode, a_dtype, b_dtype) != MODES[0]:  # the block-scaled E4M3 variants keep their file names
            name = re.sub(r"\W+", "_", f"{mode} {a_dtype} {b_dtype} ") + name
        stem = os.path.join(args.dump, name)
        ptxas = io.StringIO()
        try:
            with contextlib.redirect_stdout(ptxas):
                k = compile_variant(gg, cfg, args.out, mode, a_dtype, b_dtype)
        except Exception as e:
            print(f"\n== {label}\ncompile failed: {type(e).__name__}: {str(e)[:2000]}")
            continue
        for ext in ("ptx", "ttgir", "llir"):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(k.asm[ext])
        with open(stem + ".cubin", "wb") as f:
            f.write(k.asm["cubin"])
        sass = cuobjdump("-sass", stem + ".cubin", check=False)
        with open(stem + ".sass", "w") as f:
            f.write(sass)
        res = cuobjdump("-res-usage", stem + ".cubin", check=False)
        ptx = k.asm["ptx"]
        ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", sass, re.M))
        hgmma = sum(n for op, n in ops.items() if op.startswith(("HGMMA", "QGMMA")))  # QGMMA: the FP8 form
        depbar = sum(n for op, n in ops.items() if op.startswith("WARPGROUP.DEPBAR"))
        arrives = sum(n for op, n in ops.items() if op.startswith("WARPGROUP.ARRIVE"))
        print(f"\n== {label}")
        print(f"metadata: shared {k.metadata.shared} B, num_warps {k.metadata.num_warps}, "
              f"maxnreg {cfg.maxnreg}, launch warps {getattr(k.metadata, 'num_warps', '?')}")
        print("res-usage:", " ".join(line.strip() for line in res.splitlines() if "REG" in line))
        for line in ptxas.getvalue().splitlines():
            if "Used" in line or "spill" in line or "arning" in line or "rror" in line or "Performance" in line:
                print("ptxas:", line.strip())
        print("setmaxnreg:", re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
        forms = sorted(set(re.findall(r"WARPGROUP\.DEPBAR[.A-Z]*\s+gsb0,\s*0x\w+", sass)))
        print(f"SASS: HGMMA/QGMMA {hgmma}, WARPGROUP.DEPBAR {depbar}, WARPGROUP.ARRIVE {arrives}; depbar forms {forms}")
        print("PTX promotion:", "fma.rn.f32", len(re.findall(r"\bfma\.rn\.f32", ptx)),
              "add.rn.f32", len(re.findall(r"\badd\.rn\.f32", ptx)))
        print("PTX wgmma forms", sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.([\w.]+)", ptx))))
        print("PTX wgmma.mma_async:", len(re.findall(r"wgmma\.mma_async", ptx)),
              "wait_group depths in order:", wait_depths(ptx),
              "mbarrier.arrive:", len(re.findall(r"mbarrier\.arrive", ptx)))
        if cfg.cluster == 2:
            print("PTX pair: multicast copies", len(re.findall(r"cp\.async\.bulk\.tensor\S*multicast::cluster", ptx)),
                  "remote arrives", len(re.findall(r"mbarrier\.arrive\.shared::cluster", ptx)),
                  "waits skipped outside CTA 0", ptx.count("skipWait:"))
        print("top SASS ops:", ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
