"""Where the Python of a memory call goes: cProfile of the server process and of the client over N small Quantize
calls (CUDA IPC on a GPU, else a shared-memory tensor on the CPU backend), and on a GPU of N bare
`dispatch.quantize(x, spec, out=qt)` launches.

    python benchmarks/profile_calls.py [--calls 1000] [--rows 512] [--top 30]

The server runs under `python -m cProfile` in its own process and writes its profile when it stops (SIGINT);
both profiles are printed by own time. cProfile slows Python several times over: read the profiles for which
steps count, and the per-call milliseconds of benchmarks/service.py for how long a call takes.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

from quantd.client import QuantdClient
from quantd.kernels import QuantSpec, dispatch

QUANTD = "server/|client/|kernels/|protocol/|asyncio|triton|logging|prometheus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=512, help="rows of 1024 bf16 elements")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_profile = os.path.join(tempfile.mkdtemp(prefix="quantd-profile-"), "server.prof")
    server = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", server_profile, "-m", "quantd.cli", "serve",
                               "--host", "127.0.0.1", "--port", str(port), "--device", "cuda" if gpu else "cpu"],
                              stderr=subprocess.DEVNULL)
    try:
        client = QuantdClient(f"127.0.0.1:{port}", transport="ipc" if gpu else "shm")
        for _ in range(100):
            try:
                client.server_info()
                break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.3)
        spec = QuantSpec("fp8_e4m3", group_size=128)
        x = torch.randn(args.rows, 1024).bfloat16()
        x = x.cuda() if gpu else client.shm_tensor(x.shape, x.dtype).copy_(x)
        for _ in range(50):
            client.quantize(x, spec, report=False)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        for _ in range(args.calls):
            client.quantize(x, spec, report=False)
        profile.disable()
        print(f"# {client.last_transport}: {(time.perf_counter() - started) / args.calls * 1e3:.3f} ms a call, "
              f"the client profiled")
        if gpu:
            qt = dispatch.quantize(x, spec)
            launches = cProfile.Profile()
            launches.enable()
            for _ in range(args.calls):
                dispatch.quantize(x, spec, out=qt)
            launches.disable()
            torch.cuda.synchronize()
            print(f"# {args.calls} launches of dispatch.quantize(x, spec, out=qt)")
            pstats.Stats(launches).sort_stats("tottime").print_stats(args.top)
        client.close()
        print("# the client")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    print("# the server process")
    pstats.Stats(server_profile).sort_stats("tottime").print_stats(QUANTD, args.top)


if __name__ == "__main__":
    main()
