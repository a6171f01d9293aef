"""Quantize throughput on two GPUs against one, in one run: a one-GPU server, a two-GPU pool (one server process,
`--device cuda:0,cuda:1`) and two one-GPU servers (`--device cuda:0`, `--device cuda:1`).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/multigpu.py \
        [--tensors 32] [--size-mib 64] [--concurrency 8] [--transport grpc|shm|ipc] [--json out.json]

Each setup gets the same --tensors bf16 tensors (fp8_e4m3, 1x128 groups, report off), --concurrency calls in flight
from this process's threads; with two servers, tensor i goes to server i % 2 (a client per server). With
--transport ipc the tensors live on the GPUs: all on cuda:0 for one GPU, alternating cuda:0 / cuda:1 otherwise (a
pool runs each call on its input's GPU). The first round compiles and warms every GPU and checks every result
against the kernels' own output, bit for bit; throughput = input bytes / wall time of a round, best of --repeat.
Every server runs in its own process on 127.0.0.1 and is stopped at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from service import best_rate, free_port, wait_ready

MiB = 1 << 20
SETUPS = {"1 GPU": ["cuda:0"], "pool of 2": ["cuda:0,cuda:1"], "2 servers": ["cuda:0", "cuda:1"]}
CHECK_DEVICE = "cuda:0"  # where the results are recomputed for the check


def start(devices: list, env: dict, servers: list) -> list:
    """A `quantd serve --device D` process for each D in `devices`; their targets, once serving."""
    targets = []
    for device in devices:
        port = free_port()
        servers.append(subprocess.Popen([sys.executable, "-m", "quantd.cli", "serve", "--host", "127.0.0.1", "--port",
                                         str(port), "--device", device, "--log-format", "json"],
                                        env=env, stderr=subprocess.DEVNULL))
        targets.append(f"127.0.0.1:{port}")
    for target in targets:
        wait_ready(target)
    return targets


def inputs(args, gpus: int) -> list:
    import torch
    gen = torch.Generator().manual_seed(0)
    rows = args.size_mib * MiB // 2 // 4096
    xs = [torch.randn(rows, 4096, generator=gen).bfloat16() for _ in range(args.tensors)]
    if args.transport == "ipc":
        xs = [x.to(f"cuda:{i % gpus}") for i, x in enumerate(xs)]
    return xs


def measure(name: str, targets: list, args) -> dict:
    import torch

    from quantd.client import QuantdClient
    from quantd.kernels import dispatch
    from quantd.kernels.spec import QuantSpec
    spec = QuantSpec("fp8_e4m3", group_size=128)
    xs = inputs(args, 1 if name == "1 GPU" else 2)
    clients = [QuantdClient(t, timeout=600, transport=args.transport) for t in targets]

    def quantize(i):
        return clients[i % len(clients)].quantize(xs[i], spec, report=False)

    def round_():
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            return list(pool.map(quantize, range(len(xs))))
    for x, got in zip(xs, round_()):  # warm-up on every GPU, and the check
        want = dispatch.quantize(x.to(CHECK_DEVICE), spec)
        if not (torch.equal(got.codes.view(torch.uint8).cpu(), want.codes.view(torch.uint8).cpu())
                and torch.equal(got.scales.cpu(), want.scales.cpu())):
            raise SystemExit(f"{name}: a result differs from the kernels' output")
    rate = best_rate(round_, sum(x.numel() * x.element_size() for x in xs), args.repeat)
    placed = {d["device"]: d["requests_total"] for c in clients for d in c.server_info()["devices"]}
    transport = clients[0].last_transport.transport  # ipc falls back to grpc with the reason, if it cannot serve
    for client in clients:
        client.close()
    return {"GB/s": round(rate, 3), "requests per device": placed, "transport": transport}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tensors", type=int, default=32)
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--transport", default="grpc", choices=("grpc", "shm", "ipc"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    import torch
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {torch.cuda.get_device_name(0)} x "
          f"{torch.cuda.device_count()}  torch {torch.__version__}  cpus {os.cpu_count()}")
    print(f"# {args.tensors} x {args.size_mib} MiB bf16, fp8_e4m3 1x128, transport {args.transport}, "
          f"{args.concurrency} in flight; GB/s = input bytes / wall time, best of {args.repeat}")
    results = {}
    for name, devices in SETUPS.items():
        servers: list = []
        try:
            results[name] = measure(name, start(devices, env, servers), args)
        finally:
            for server in servers:
                server.terminate()
                server.wait(60)
        ratio = results[name]["GB/s"] / results["1 GPU"]["GB/s"]
        print(f"{name:>10}  {results[name]['GB/s']:8.3f} GB/s  {ratio:5.2f} x one GPU  "
              f"({results[name]['transport']}; requests per device {results[name]['requests per device']})", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
