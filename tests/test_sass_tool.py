"""The offline compile tools, on a machine without a GPU (triton's own ptxas and cuobjdump):
benchmarks/sass.py for the quantize and dequantize kernels (its --common-path copy of the kernels must find the
branches it removes), benchmarks/gluon_gemm_sass.py for the Gluon GEMM."""
import os
import re
import subprocess
import sys

import pytest

from quantd.kernels import gluon_gemm
from quantd.kernels import triton_gemm as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(script: str, *args, timeout: int = 600) -> str:
    """stdout of benchmarks/`script` run with `args`, compiled, not interpreted; fails on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles; nothing runs
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                         text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# The tool's two modes: every kernel as shipped, and the common-path copies (every module's rare branches removed, which
# --common-path checks for in each module whatever it compiles) of one kernel or more of each patched module, under
# settings of --set.
COMMON_PATH = ["--common-path", "--only", "tensor|dual|pairs kernel|^nvfp4$", "--set",
               "lookup_tile=None,dual_slabs=1,delayed_words=(1,512,1)"]


@pytest.mark.parametrize("flags", [[], COMMON_PATH], ids=["static", "common-path"])
def test_sass_tool_counts_every_kernel(flags, tmp_path):
    stdout = run_tool("sass.py", "--shape", "1024", "1024", "--dump", str(tmp_path), *flags)
    counts = dict(re.findall(r"^(.+?)\s+(\d+\.\d) instructions/element", stdout, re.M))
    some = {"fp8 e4m3 tensor, delayed", "fp8 e4m3 tensor, delayed words", "fp8 e4m3 dual 1x128",
            "fp8 e4m3 dual 1x128, unit strides", "mxfp4, pairs kernel", "int8 asym 1x128, pairs kernel", "nvfp4"}
    every = some | {"fp8 e4m3 1x128", "fp8 e4m3 128x128", "mxfp4", "int8 asym 1x128", "dequantize fp8 e4m3 1x128",
                    "dequantize nvfp4"}
    assert (some if "--only" in flags else every) <= set(counts), stdout
    if "--only" in flags:
        assert "fp8 e4m3 1x128" not in counts and "dequantize nvfp4" not in counts, stdout
    assert all(5 < float(v) < 200 for v in counts.values()), counts
    # No kernel merges a converted pair with anything but a conversion (sass.stray_merges: a ptxas miscompile's mark)
    merges = re.findall(r"(\d+) stray merges\)", stdout)
    assert len(merges) == len(counts) and set(merges) == {"0"}, stdout


def test_gemm_sass_tool_counts_every_mx_config(tmp_path):
    """benchmarks/gemm_sass.py finds the K loop of every MX GEMM config, without spills; the bf16x2 MXFP4 decode
    (shipped) stays well under the fp32 one (KernelConfig.packed_decode = False, about 5 against 18 instructions per
    element with triton 3.6), which is compiled with the first config only."""
    cfg = tg.MX_CONFIGS[0]
    first = re.escape(f" {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} "
                      f"s{cfg.num_stages}") + "$"  # gemm_sass.py's label of the config
    for flags, configs in (([], len(tg.MX_CONFIGS)), (["--fp32-decode", "--only", first], 1)):
        check_gemm_sass(run_tool("gemm_sass.py", "--dump", str(tmp_path), *flags, timeout=900), flags, configs)


def check_gemm_sass(stdout: str, flags: list, configs: int):
    rows = re.findall(r"^(mxfp\d x mxfp4 \S+ w\d s\d)\s+(\d+\.\d) instructions/element.*?(\d+) spill instructions",
                      stdout, re.M)
    assert len(rows) == 2 * configs, stdout
    for name, per_element, spills in rows:
        assert spills == "0", name
        assert (float(per_element) < 8) if not flags else (float(per_element) > 8), (name, per_element)


def test_gluon_kernel_compiles_for_sm90(tmp_path):
    """Without a GPU: the Gluon launch variants compile for sm_90 with the installed triton, in both
    modes (block-scaled, per-tensor), with E5M2 operands, with its K blocks split over work items and with three
    consumer warpgroups (192-row tiles), keeps its registers (no spills), uses the FP8
    wgmma, and (two warpgroups) leaves one MMA in flight while a product is promoted (wait_group 1); ptxas does
    not serialize the wgmmas. From triton 3.9 on also the variant over pairs of CTAs (gluon_gemm.PAIR): B copied
    by multicast, its slots freed by remote arrives on the pair's barrier, whose waits run in CTA 0 only."""
    if not gluon_gemm.AVAILABLE:
        pytest.fail(gluon_gemm.UNAVAILABLE_REASON)
    default = gluon_gemm.CONFIGS[0]
    # block-scaled: each chain and warpgroup count of CONFIGS at its deepest ring (fewer stages of the same program
    # only shrink the ring); per tensor: the default and the three-warpgroup variant (the others differ from the
    # default in their stages and chains only, which the block-scaled mode compiles)
    deepest = {}
    for cfg in gluon_gemm.CONFIGS:
        shape = tuple(sorted((k, v) for k, v in vars(cfg).items() if k != "stages"))  # all but the ring's depth
        if shape not in deepest or cfg.stages > deepest[shape].stages:
            deepest[shape] = cfg
    block_scaled = [cfg for cfg in gluon_gemm.CONFIGS if cfg in deepest.values()]
    assert default in block_scaled and gluon_gemm.THREE_WARPGROUPS in block_scaled
    expected = [f"{mode} fp8e4nv x fp8e4nv | {cfg!r}" for mode, configs in
                (("block-scaled", block_scaled), ("per-tensor", (default, gluon_gemm.THREE_WARPGROUPS)))
                for cfg in configs] + [f"block-scaled fp8e5 x fp8e4nv | {default!r}",
                                       f"per-row fp8e4nv x fp8e5 | {default!r}",
                                       f"block-scaled split fp8e4nv x fp8e4nv | {default!r}",
                                       f"per-row split fp8e4nv x fp8e4nv | {default!r}"]
    if gluon_gemm.CLUSTER_AVAILABLE:
        expected.append(f"block-scaled fp8e4nv x fp8e4nv | {gluon_gemm.PAIR!r}")
    only = "^(" + "|".join(map(re.escape, expected)) + ")$"
    stdout = run_tool("gluon_gemm_sass.py", "--dump", str(tmp_path), "--only", only)
    variants = stdout.split("\n== ")[1:]
    labels = [v.splitlines()[0] for v in variants]
    assert labels == expected, stdout[-3000:]
    for v in variants:
        assert "compile failed" not in v and "serialized" not in v, v
        assert "0 bytes spill stores, 0 bytes spill loads" in v, v
        assert int(re.search(r"HGMMA/QGMMA (\d+)", v).group(1)) > 0, v
        dtypes = re.search(r"(fp8e\w+) x (fp8e\w+)", v.splitlines()[0]).groups()
        ptx_types = {"fp8e4nv": "e4m3", "fp8e5": "e5m2"}
        forms = "['m64n128k32.f32.{}.{}']".format(*(ptx_types[d] for d in dtypes))  # the operands' FP8 types
        assert f"wgmma forms {forms}" in v, v
        depths = re.search(r"wait_group depths in order: \[([\d, ]*)\]", v).group(1).split(", ")
        # Two warpgroups pipeline their own MMAs (one left in flight while a product is promoted); three wait for
        # each (one product tile each: the other warpgroups' MMAs fill the tensor cores).
        assert ("1" in depths) if "gluon 128x128x128" in v.splitlines()[0] else set(depths) == {"0"}, v
        fma, add = map(int, re.search(r"promotion: fma\.rn\.f32 (\d+) add\.rn\.f32 (\d+)", v).groups())
        assert (fma > 0 and add == 0) if v.startswith("block-scaled") else (fma == 0 and add > 0), v
        pair = re.search(r"pair: multicast copies (\d+) remote arrives (\d+) waits skipped outside CTA 0 (\d+)", v)
        assert (pair is not None) == ("cluster2" in v.splitlines()[0]), v
        if pair:
            assert all(int(n) > 0 for n in pair.groups()), v


@pytest.mark.skipif(not gluon_gemm.CLUSTER_AVAILABLE, reason="pairs of CTAs need triton 3.9 or later")
def test_pair_probe_instruments_this_kernel():
    """benchmarks/gluon_pair_probe.py --progress runs a copy of the kernel with progress stores, patched into this
    version of its source: each anchor found once, and the copy compiles for sm_90 (a store after each slot copied
    and each chain, in both CTAs)."""
    stdout = run_tool("gluon_pair_probe.py", "--compile-only")
    stores = int(re.search(r"(\d+) global stores in the PTX", stdout).group(1))
    assert stores > 8, stdout


def test_stray_merges_are_found(monkeypatch):
    """sass.stray_merges: a merge of a converted pair with a shifted register (the miscompile's form, from the stack
    pointer R1), not one with a conversion that merged nothing, also where .reuse marks the operand."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import sass
    listing = "\n".join(f"        /*{i:04x}*/                   {text} ;                  /* 0x0000 */" for i, text in
                        enumerate(["LDC R1, c[0x0][0x28]", "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R5, R6, R7, RZ",
                                   "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R8, R9, R10, R5.reuse",
                                   "LOP3.LUT R128, R1, 0xffff, RZ, 0xc0, !PT", "SHF.R.U32.HI R128, RZ, 0x8, R128",
                                   "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R56, R79, R78, R128"]))
    assert sass.stray_merges(listing) == ["F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R56, R79, R78, R128"]
