"""The offline compile tools, on a machine without a GPU (triton's own ptxas and cuobjdump):
benchmarks/sass.py for the quantize kernels (its --common-path copy of the kernels must find the
branches it removes), benchmarks/gluon_gemm_sass.py for the Gluon GEMM."""
import os
import re
import subprocess
import sys

import pytest

from quantd.kernels import gluon_gemm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(script: str, *args) -> str:
    """stdout of benchmarks/`script` run with `args`, compiled, not interpreted; fails on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles; nothing runs
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("flags", [[], ["--common-path"]], ids=["static", "common-path"])
def test_sass_tool_counts_every_kernel(flags, tmp_path):
    stdout = run_tool("sass.py", "--shape", "1024", "1024", "--dump", str(tmp_path), *flags)
    counts = dict(re.findall(r"^(.+?)\s+(\d+\.\d) instructions/element", stdout, re.M))
    assert {"fp8 e4m3 1x128", "fp8 e4m3 128x128", "mxfp4", "int8 asym 1x128", "mxfp4, pairs kernel"} <= set(counts)
    assert all(5 < float(v) < 200 for v in counts.values()), counts


def test_gluon_kernel_compiles_for_sm90(tmp_path):
    """Without a GPU: every Gluon launch variant compiles for sm_90 with the installed triton, keeps its
    registers (no spills), uses the FP8 wgmma, and leaves one MMA in flight while a product is scaled
    (wait_group 1); ptxas does not serialize the wgmmas."""
    if not gluon_gemm.AVAILABLE:
        pytest.fail(gluon_gemm.UNAVAILABLE_REASON)
    stdout = run_tool("gluon_gemm_sass.py", "--dump", str(tmp_path))
    variants = stdout.split("\n== ")[1:]
    assert len(variants) == len(gluon_gemm.CONFIGS), stdout[-3000:]
    for v in variants:
        assert "compile failed" not in v and "serialized" not in v, v
        assert "0 bytes spill stores, 0 bytes spill loads" in v, v
        assert int(re.search(r"HGMMA/QGMMA (\d+)", v).group(1)) > 0, v
        depths = re.search(r"wait_group depths in order: \[([\d, ]*)\]", v).group(1)
        assert "1" in depths.split(", "), v
