"""Instructions per decoded element of the MX GEMM's K loop, compiled for sm_90 on a machine without a GPU.

    python benchmarks/gemm_sass.py [--dump DIR] [--fp32-decode] [--only REGEX]

For every launch config in triton_gemm.MX_CONFIGS and the pairings MXFP4 x MXFP4 and MXFP8 x MXFP4:
triton.compile of `_mx_gemm_kernel` for sm_90 with the specializations a real launch of contiguous
operands gets (16-byte aligned pointers, M = N = K = 4096, unit strides of C and of the scales' K
dimension), then the SASS of the K loop (the innermost loop holding the HGMMAs): its static
instruction count, divided by the elements a thread decodes per K step ((BLOCK_M + BLOCK_N) x
BLOCK_K / threads), the same per K step, the most frequent opcodes, and registers and spills
(cuobjdump -res-usage; spills as STL/LDL instructions). --fp32-decode counts the fp32 decode (KernelConfig.packed_decode = False).
Like benchmarks/sass.py: static counts of one kernel's variants, a proxy, not a timing.
"""
from __future__ import annotations

import argparse
import collections
import os
import re

import triton

from quantd.kernels import triton_gemm as tg
from quantd.kernels.config import DEFAULT
from quantd.kernels.spec import MX_BLOCK

from sass import compile_sm90, opcodes, resources, sass_of

PAIRINGS = [("mxfp4 x mxfp4", True, True), ("mxfp8 x mxfp4", False, True)]
SIZE = 4096


def compile_mx(cfg, a_fp4: bool, b_fp4: bool, packed: bool):
    fn = tg._mx_gemm_kernel
    kw = cfg.kwargs
    bk = kw["BLOCK_K"]

    def desc(fp4, rows):
        return f"tensordesc<u8[{rows}, {bk // 2}]>" if fp4 else f"tensordesc<fp8e4nv[{rows}, {bk}]>"

    constexprs = dict(kw, A_FP4=a_fp4, B_FP4=b_fp4, GROUP=MX_BLOCK, SCALE_E4M3=False, NUM_SMS=132, DOT_FP32=False,
                      PACKED=packed, stride_cn=1, stride_sak=1, stride_sbk=1)
    types = dict(a_desc=desc(a_fp4, kw["BLOCK_M"]), b_desc=desc(b_fp4, kw["BLOCK_N"]), c_ptr="*bf16",
                 sa_ptr="*u8", sb_ptr="*u8", ta_ptr="*fp32", tb_ptr="*fp32")
    names = fn.arg_names
    constexprs = {k: v for k, v in constexprs.items() if k in names}  # a kernel without PACKED: the fp32 decode
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = {"M", "N", "K", "stride_cm", "stride_sam", "stride_sbn"}  # as at 4096 (and every pointer)
    return compile_sm90(fn, signature, constexprs, aligned, cfg.num_warps, stages=cfg.num_stages)


def k_loop(sass: str) -> list:
    """Opcodes of the K loop: from the target of the first backward branch after the first HGMMA that
    jumps back over it, to that branch (the mbarrier retry stubs after the kernel's end jump back into
    the loop too, but from further on)."""
    lines = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*)", line)
        if m:
            lines.append((int(m.group(1), 16), m.group(2)))
    first_mma = next((a for a, t in lines if "GMMA" in t), None)
    if first_mma is None:
        raise SystemExit("gemm_sass.py: no HGMMA in the kernel")
    for addr, text in lines:
        b = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if addr > first_mma and b and int(b.group(1), 16) <= first_mma:
            start = int(b.group(1), 16)
            return opcodes("\n".join("        /*0000*/ " + t for a, t in lines if start <= a <= addr))
    raise SystemExit("gemm_sass.py: found no loop around the HGMMAs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default="/tmp/quantd-gemm-sass", help="folder for the cubins and SASS listings")
    ap.add_argument("--fp32-decode", action="store_true", help="count the fp32 decode (packed_decode=False)")
    ap.add_argument("--only", default="", metavar="REGEX", help="only the configs whose labels match")
    args = ap.parse_args()
    os.makedirs(args.dump, exist_ok=True)
    packed = DEFAULT.packed_decode and not args.fp32_decode
    print(f"triton {triton.__version__}, sm_90, _mx_gemm_kernel, {'bf16x2' if packed else 'fp32'} MXFP4 decode")
    for name, a_fp4, b_fp4 in PAIRINGS:
        for cfg in tg.MX_CONFIGS:
            kw = cfg.kwargs
            label = f"{name} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
            if not re.search(args.only, label):
                continue
            kernel = compile_mx(cfg, a_fp4, b_fp4, packed)
            stem = os.path.join(args.dump, re.sub(r"\W+", "_", label))
            sass = sass_of(kernel, stem + ".cubin")
            with open(stem + ".sass", "w") as f:
                f.write(sass)
            loop = k_loop(sass)
            per_thread = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] / (cfg.num_warps * 32)
            spills = sum(op in ("STL", "LDL") for op in opcodes(sass))
            top = ", ".join(f"{op} {n}" for op, n in collections.Counter(loop).most_common(10))
            print(f"{label:34s} {len(loop) / per_thread:5.1f} instructions/element, {len(loop)} a K step "
                  f"({per_thread:.0f} elements a thread), {resources(stem + '.cubin')}, {spills} spill instructions, "
                  f"{len(opcodes(sass))} in all\n    {top}")


if __name__ == "__main__":
    main()
