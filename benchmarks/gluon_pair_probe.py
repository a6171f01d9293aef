"""Where the GEMM over pairs of CTAs (kernels/gluon_gemm.py, cluster 2) stops, on an sm_90 GPU with triton 3.9.

    python3 benchmarks/gluon_pair_probe.py [--stages 5] [--chain 8] [--progress] [--wait 6] M N K [M N K ...]

Each shape runs in a process of its own: one launch of GluonConfig(stages, chain, cluster=2) on E4M3 operands
quantized as gluon_gemm_check.py's (A 1x128 groups, B 128x128 tiles), compared bit for bit with the default
variant's product; a launch not done `--wait` seconds after it was issued is reported HUNG and its process killed
(the next shape starts afresh).

--progress launches an instrumented copy of the kernel instead (the module's source with stores added, loaded
from a temporary file; the shipped kernel is untouched): per pair of CTAs and per CTA, the producer's slot
counter before its waits (`waits at`) and after its copies (`issued`), and each consumer warpgroup's counter after
each chain of K blocks (`wg0`, `wg1`), read from another stream while the kernel runs (or after it ends). Slot c
is ring slot c % stages in lap c // stages, so a hang shows which barrier phase each party waits for.

    --compile-only   (no GPU) write the instrumented copy and compile it for sm_90: the stores apply to this
                     version of the kernel.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRESS_WORDS = 512  # floats a pair: 4 fields x 2 CTAs x 32 lanes, then room


def _instrumented_source(src: str) -> str:
    """gluon_gemm.py with progress stores into the kernel's ws_ptr (unused by unsplit launches; _launch passes
    PROGRESS there). Each store writes a 64-float vector split over the pair (cga_layout [[1]]): CTA r's 32 lanes
    at field * 64 + r * 32."""
    def sub(old, new, count=1):
        nonlocal src
        assert src.count(old) == count, f"the kernel changed: {old!r} found {src.count(old)} times"
        src = src.replace(old, new)

    def after(anchor, added):
        sub(anchor, anchor + added)

    vector = ("{i}dl: gl.constexpr = gl.BlockedLayout([1], [32], [{w}], [0], cga_layout=[[1]])\n"
              "{i}dofs = gl.arange(0, 64, layout=dl)\n{i}dbase = progress + gl.program_id(0) * {words}{field}\n")
    store = "{i}gl.store(dbase{field} + dofs, gl.full([64], c, gl.float32, dl))\n"
    i2, i4, i5 = " " * 8, " " * 16, " " * 20
    for doc in ("TMA loads", "One warpgroup"):  # the producer's and the consumers' signatures
        sub(f"CLUSTER: gl.constexpr):\n{i2}\"\"\"{doc}", f"CLUSTER: gl.constexpr, progress):\n{i2}\"\"\"{doc}")
    # producer: the counter before its waits, and after its copies
    after(f"{i2}c = 0\n", vector.format(i=i2, w=1, words=PROGRESS_WORDS, field=""))
    after(f"{i4}s = c % STAGES\n", store.format(i=i4, field=""))
    after(f"b_bufs.index(s))\n{i4}c += 1\n", store.format(i=i4, field=" + 64"))
    # consumers: the counter after each chain
    after(f"{i2}c = 0  # slot counter, in step with the producer's\n",
          vector.format(i=i2, w=4, words=PROGRESS_WORDS, field=" + 128 + WG * 64"))
    for step in ("CHAIN", "2"):
        after(f"{i5}c += {step}\n{i5}kb += {step}\n", store.format(i=i5, field=""))
    sub("SCALE_PER_K, SPLIT, PIECES, CLUSTER)),", "SCALE_PER_K, SPLIT, PIECES, CLUSTER, ws_ptr)),", count=5)
    sub("GROUP_M, STAGES, SPLIT, PIECES, CLUSTER)),", "GROUP_M, STAGES, SPLIT, PIECES, CLUSTER, ws_ptr)),", count=2)
    sub("    ws = torch.empty((split, M, N), dtype=torch.float32, device=c.device) if split > 1 else c\n",
        "    assert split == 1, 'the instrumented copy launches unsplit GEMMs'\n    ws = PROGRESS\n")
    return src + "\n\nPROGRESS = None  # the progress words' tensor, set before a launch\n"


def instrumented_module():
    """The instrumented copy of quantd.kernels.gluon_gemm, imported from a temporary file (triton reads the
    kernels' source from it) as a module of the package, so that its relative imports resolve."""
    from quantd.kernels import gluon_gemm
    with open(gluon_gemm.__file__) as f:
        src = _instrumented_source(f.read())
    path = os.path.join(tempfile.mkdtemp(prefix="quantd-pair-probe-"), "gluon_gemm_progress.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("quantd.kernels.gluon_gemm_progress", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compile_only() -> None:
    import gluon_gemm_sass  # beside this script (its folder is on the path of a script run)
    gg = instrumented_module()
    if not gg.CLUSTER_AVAILABLE:
        sys.exit(f"pairs of CTAs need triton 3.9 or later; this is {gg.triton.__version__}")
    kernel = gluon_gemm_sass.compile_variant(gg, gg.PAIR, out="fp32")
    print(f"instrumented {gg.PAIR!r}: {kernel.asm['ptx'].count('st.global')} global stores in the PTX")


def run_one(stages: int, chain: int, m: int, n: int, k: int, progress: bool, wait: float) -> None:
    import torch
    from gluon_gemm_check import operands
    from quantd.kernels import gluon_gemm
    gg = instrumented_module() if progress else gluon_gemm
    qa, qb = operands(m, n, k, m + n + k)
    args = (qa.codes, qa.scales, qb.codes, qb.scales, torch.float32)
    kb = qa.scales.shape[1]
    want = gluon_gemm.blockscaled_matmul(*args)
    if progress:
        gg.PROGRESS = torch.full((PROGRESS_WORDS * torch.cuda.get_device_properties(0).multi_processor_count, ),
                                 -1.0, device="cuda")
    torch.cuda.synchronize()
    got = gg.blockscaled_matmul(*args, config=gg.GluonConfig(stages, chain, cluster=2))
    done = torch.cuda.Event()
    done.record()
    start = time.time()  # after the launch call: a first compile is not counted
    while not done.query() and time.time() - start < wait:
        time.sleep(0.01)
    label = f"stages {stages} chain {chain} {m} x {n} x {k} ({kb} K blocks)"
    if done.query():
        print(f"{label}: ran in {time.time() - start:.3f} s, the default's bits: {torch.equal(got, want)}", flush=True)
    else:
        print(f"{label}: HUNG (not done {wait:g} s after its launch)", flush=True)
    if progress:
        report_progress(gg.PROGRESS, wait)
    if not done.query():
        os.kill(os.getpid(), signal.SIGKILL)  # the hung kernel holds the context: no orderly exit


def report_progress(words, wait: float) -> None:
    import torch
    side = torch.cuda.Stream()  # the default stream waits behind the kernel; a copy on another does not
    host = torch.empty(words.shape, pin_memory=True)
    with torch.cuda.stream(side):
        host.copy_(words, non_blocking=True)
    start = time.time()
    while not side.query() and time.time() - start < wait:
        time.sleep(0.01)
    if not side.query():
        print("  progress: the copy did not complete", flush=True)
        return
    names = ("waits at", "issued", "wg0", "wg1")
    for pair, row in enumerate(host.view(-1, PROGRESS_WORDS).tolist()):
        if any(v >= 0 for v in row[:256]):
            print(f"  pair {pair}: " + " | ".join(
                f"CTA {r} " + " ".join(f"{name} {row[f * 64 + r * 32]:g}" for f, name in enumerate(names))
                for r in range(2)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=int, help="M N K, repeated")
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--progress", action="store_true", help="the instrumented copy, with its counters")
    ap.add_argument("--wait", type=float, default=6.0, help="seconds after the launch before HUNG")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: the one shape, here
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    if len(args.sizes) % 3 or not args.sizes:
        ap.error("sizes come as M N K, one triple or more")
    shapes = [args.sizes[i:i + 3] for i in range(0, len(args.sizes), 3)]
    if args.one:
        return run_one(args.stages, args.chain, *shapes[0], args.progress, args.wait)
    flags = ["--stages", str(args.stages), "--chain", str(args.chain), "--wait", str(args.wait)]
    flags += ["--progress"] if args.progress else []
    for shape in shapes:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", *flags, *map(str, shape)],
                               capture_output=True, text=True, timeout=300)
        lines = [line for line in child.stdout.splitlines() if line.strip()]
        print("\n".join(lines) if lines else f"{shape}: no report (exit {child.returncode}): "
                                             f"{child.stderr.strip()[-800:]}", flush=True)


if __name__ == "__main__":
    main()
