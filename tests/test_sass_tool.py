"""benchmarks/sass.py compiles the quantize kernels for sm_90 without a GPU (triton's own ptxas and
cuobjdump); its --common-path copy of the kernels must find the branches it removes."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags", [[], ["--common-path"]], ids=["static", "common-path"])
def test_sass_tool_counts_every_kernel(flags, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles; nothing runs
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass.py"), "--shape", "1024", "1024",
                          "--dump", str(tmp_path), *flags], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(re.findall(r"^(.+?)\s+(\d+\.\d) instructions/element", out.stdout, re.M))
    assert {"fp8 e4m3 1x128", "fp8 e4m3 128x128", "mxfp4", "int8 asym 1x128", "mxfp4, pairs kernel"} <= set(counts)
    assert all(5 < float(v) < 200 for v in counts.values()), counts


@pytest.mark.parametrize("flags", [[], ["--fp32-decode"]], ids=["bf16x2", "fp32"])
def test_gemm_sass_tool_counts_every_mx_config(flags, tmp_path):
    """benchmarks/gemm_sass.py finds the K loop of every MX GEMM config; the bf16x2 MXFP4 decode stays
    well under the fp32 one (about 5 against 18 instructions per element with triton 3.6) without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gemm_sass.py"), "--dump", str(tmp_path),
                          *flags], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^(mxfp\d x mxfp4 \S+ w\d s\d)\s+(\d+\.\d) instructions/element.*?(\d+) spill instructions",
                      out.stdout, re.M)
    assert len(rows) == 8, out.stdout
    for name, per_element, spills in rows:
        assert spills == "0", name
        assert (float(per_element) < 8) if not flags else (float(per_element) > 8), (name, per_element)
