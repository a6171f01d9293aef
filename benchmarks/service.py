"""Quantize throughput through the service against a raw gRPC byte stream (the ceiling).

    python benchmarks/service.py [--sizes-mib 64 256 1024] [--chunks-kib 64 1024 4096] [--device auto]
    python benchmarks/service.py --transports [--workers 8] [--sizes-mib 16 64 256 1024] [--plot out.png]
    python benchmarks/service.py --scaling 1 2 4 8 [--sizes-mib 1024]

Both servers run in their own process on 127.0.0.1 (so client and server do not share a
GIL), and both see the same traffic: the client uploads the tensor in chunks of the same size,
the server sends back half as many bytes (the fp8 codes of a bf16 tensor) as they arrive.
The raw server does nothing else, so its rate is what Python gRPC can move; quantd's ratio to it
says how much of the link the service keeps. Throughput = input bytes / wall time of the call,
best of --repeat runs (with --transports, of --memory-repeat runs for the memory paths, whose calls are short).

--transports compares the ways a tensor can reach the server (quantd.client.transports), 4 MiB chunks: grpc
(one stream), shm (the tensor copied into a shared-memory region), shm-tensor (the tensor already lives in one,
QuantdClient.shm_tensor), streams (split over --workers connections, one per client worker process, to `quantd
serve --workers N`, beside grpc to that server: grpc@workers), and on a GPU ipc (a CUDA tensor passed by its CUDA
IPC handle; the same tensor every call, so the server replays it) and ipc-fresh (another tensor every call, shared
and opened anew), beside the raw gRPC ceiling, the kernel alone on the server's device, and (on a GPU) pinned
host-to-device copies.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import grpc

RAW_METHOD = "/bench.Raw/Stream"
MiB = 1 << 20


def raw_server(port: int) -> None:
    """Stream-stream echo of half the bytes of every request message, with no protobuf at all."""
    import asyncio

    async def stream(request_iterator, context):
        async for data in request_iterator:
            yield data[: len(data) // 2]

    async def main():
        handler = grpc.method_handlers_generic_handler("bench.Raw", {
            "Stream": grpc.stream_stream_rpc_method_handler(stream)})
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())


def raw_call(channel, data: memoryview, chunk: int) -> None:
    call = channel.stream_stream(RAW_METHOD)

    def requests():
        for start in range(0, len(data), chunk):
            yield bytes(data[start:start + chunk])
    for _ in call(requests()):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(target: str, seconds: float = 120) -> None:
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=seconds)
    channel.close()


def best_rate(fn, nbytes: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / min(times) / 1e9


def kernel_rate(x, spec, device: str, repeat: int) -> float:
    """GB/s of the quantize kernel alone on `device` (input already there)."""
    import torch

    from quantd.kernels import dispatch
    x = x.to(device)

    def run():
        dispatch.quantize(x, spec)
        if x.is_cuda:
            torch.cuda.synchronize()
    run()
    return best_rate(run, x.numel() * x.element_size(), repeat)


def h2d_rate(nbytes: int, repeat: int) -> float:
    import torch
    host, dev = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def run():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
    run()
    return best_rate(run, nbytes, repeat)


STREAMED = ("raw", "grpc", "grpc@workers", "streams")  # the --transports columns timed --repeat times


def raw_client(port: int, nbytes: int) -> None:
    """One of --scaling's parallel raw streams: warms, waits for a line on stdin, streams `nbytes` in 4 MiB
    messages (best of two), prints its start and end (time.time())."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])
    data = memoryview(bytes(nbytes))
    raw_call(channel, data[:4 * MiB], 4 * MiB)
    print("ready", flush=True)
    sys.stdin.readline()
    spans = []
    for _ in range(2):
        started = time.time()
        raw_call(channel, data, 4 * MiB)
        spans.append((started, time.time()))
    print(*min(spans, key=lambda span: span[1] - span[0]), flush=True)


def raw_parallel_rate(n: int, nbytes: int, env) -> float:
    """GB/s of n raw byte streams at once, each from a client process of its own to a raw server of its own:
    what Python gRPC moves with n interpreters a side on this machine."""
    ports = [free_port() for _ in range(n)]
    servers = [subprocess.Popen([sys.executable, __file__, "--raw-server", str(p)], env=env) for p in ports]
    try:
        for p in ports:
            wait_ready(f"127.0.0.1:{p}")
        clients = [subprocess.Popen([sys.executable, __file__, "--raw-client", str(p), str(nbytes // n)], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p in ports]
        for c in clients:
            assert c.stdout.readline().strip() == "ready"
        for c in clients:
            c.stdin.write("go\n")
            c.stdin.flush()
        spans = [tuple(map(float, c.communicate(timeout=600)[0].split())) for c in clients]
        return nbytes // n * n / (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e9
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)


def scaling_main(args, env) -> None:
    """--scaling: N parallel streams (`quantd serve --workers N`, the client's transport="streams") against N
    raw byte streams in parallel processes (the ceiling of N Python gRPC streams on this machine) and against N x
    one stream to the same server, for each N."""
    import torch

    from quantd.client import QuantdClient
    from quantd.kernels.spec import QuantSpec

    spec = QuantSpec(args.format, group_size=args.group)
    size = max(args.sizes_mib)
    x = torch.randn(size * MiB // 2 // 4096, 4096).bfloat16()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  grpc {grpc.__version__}  cpus {os.cpu_count()}  "
          f"{size} MiB bf16, {spec.describe()}; GB/s = input bytes / wall time, best of {args.repeat}")
    print(f"{'N':>3} {'raw x1':>8} {'raw xN':>8} {'grpc':>8} {'streams':>8} {'streams/rawN':>13} {'streams/(N*grpc)':>17}",
          flush=True)
    for n in args.scaling:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "quantd.cli", "serve", "--host", "127.0.0.1", "--port",
                                   str(port), "--device", args.device, "--workers", str(n), "--log-format", "json"],
                                  env=env, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"127.0.0.1:{port}")
            rates = {}
            for name, client in (("grpc", QuantdClient(f"127.0.0.1:{port}")),
                                 ("streams", QuantdClient(f"127.0.0.1:{port}", transport="streams",
                                                          parallel_streams=n))):
                with client:
                    client.quantize(x if name == "streams" else x[:4096], spec, report=False)  # warm
                    rates[name] = best_rate(lambda: client.quantize(x, spec, report=False), x.numel() * 2, args.repeat)
        finally:
            server.terminate()
            server.wait(30)
        raw = {k: raw_parallel_rate(k, x.numel() * 2, env) for k in sorted({1, n})}
        print(f"{n:>3} {raw[1]:>8.2f} {raw[n]:>8.2f} {rates['grpc']:>8.2f} {rates['streams']:>8.2f} "
              f"{rates['streams'] / raw[n]:>13.2f} {rates['streams'] / (n * rates['grpc']):>17.2f}", flush=True)


def transports_main(args, servers, env) -> None:
    import torch

    from quantd.client import QuantdClient
    from quantd.kernels import dispatch
    from quantd.kernels.spec import QuantSpec
    from quantd.protocol import wire

    raw_target, quantd_target = f"127.0.0.1:{args.ports[0]}", f"127.0.0.1:{args.ports[1]}"
    workers_port = free_port()
    servers.append(subprocess.Popen([sys.executable, "-m", "quantd.cli", "serve", "--host", "127.0.0.1", "--port",
                                     str(workers_port), "--device", args.device, "--workers", str(args.workers),
                                     "--log-format", "json"], env=env, stderr=subprocess.DEVNULL))
    workers_target = f"127.0.0.1:{workers_port}"
    wait_ready(workers_target)
    spec = QuantSpec(args.format, group_size=args.group)
    raw_channel = grpc.insecure_channel(raw_target, options=[("grpc.max_receive_message_length", -1)])
    clients = {"grpc": QuantdClient(quantd_target), "shm": QuantdClient(quantd_target, transport="shm"),
               "shm-tensor": QuantdClient(quantd_target, transport="shm"),
               "grpc@workers": QuantdClient(workers_target),
               "streams": QuantdClient(workers_target, transport="streams", parallel_streams=args.workers)}
    gpu = torch.cuda.is_available() and args.device != "cpu"
    if gpu:  # ipc: the same tensor again (replayed); ipc-fresh: another tensor each call (shared and opened)
        clients["ipc"] = QuantdClient(quantd_target, transport="ipc")
        clients["ipc-fresh"] = QuantdClient(quantd_target, transport="ipc")
    device = clients["grpc"].server_info()["device"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  device={device}  grpc {grpc.__version__}  "
          f"torch {torch.__version__}  cpus {os.cpu_count()}  workers {args.workers}")
    print(f"# spec {spec.describe()}, bf16 input, report off; GB/s = input bytes / wall time, best of {args.repeat} "
          f"({args.memory_repeat} for the memory paths, the kernel and h2d)")
    names = ["raw", *clients, "kernel"] + (["h2d"] if gpu else [])
    print(f"{'size MiB':>8} " + " ".join(f"{n:>12}" for n in names), flush=True)
    rows = []
    for size in args.sizes_mib:
        x = torch.randn(size * MiB // 2 // 4096, 4096).bfloat16()
        data = wire.tensor_bytes(x)
        local = dispatch.quantize(x[:256], spec)
        rates = {"raw": best_rate(lambda: raw_call(raw_channel, data, 4 * MiB), len(data), args.repeat)}
        for name, client in clients.items():
            source = x
            if name == "shm-tensor":
                source = client.shm_tensor(x.shape, x.dtype)
                source.copy_(x)
            elif name.startswith("ipc"):
                source = x.cuda()
            fresh = [source.clone() for _ in range(args.memory_repeat + 1)] if name == "ipc-fresh" else []
            # warm: compiles, opens the session; a memory call also shares its result buffer of this size once
            client.quantize(fresh.pop() if fresh else source if name in ("shm", "shm-tensor", "ipc") else
                            source[:4096], spec, report=False)
            result = {}

            def call():
                result.clear()  # the last result let go first: its buffer serves again, as in a loop of calls
                result.update(q=client.quantize(fresh.pop() if fresh else source, spec, report=False))
            rates[name] = best_rate(call, len(data), args.repeat if name in STREAMED else args.memory_repeat)
            assert client.last_transport.transport == name.split("@")[0].split("-")[0], client.last_transport
            fresh.clear()  # the clones not used go now
            assert torch.equal(result["q"].codes[:256].view(torch.uint8).cpu(), local.codes.view(torch.uint8))
        rates["kernel"] = kernel_rate(x, spec, "cuda" if gpu else "cpu", args.memory_repeat)
        if "h2d" in names:
            rates["h2d"] = h2d_rate(len(data), args.memory_repeat)
        rows.append((size, rates))
        print(f"{size:>8} " + " ".join(f"{rates[n]:>12.2f}" for n in names), flush=True)
    for size, rates in rows:
        print(f"# {size} MiB: shm/grpc {rates['shm'] / rates['grpc']:.2f}  shm-tensor/grpc "
              f"{rates['shm-tensor'] / rates['grpc']:.2f}  streams/(N x grpc@workers) "
              f"{rates['streams'] / (args.workers * rates['grpc@workers']):.2f}"
              + (f"  shm-tensor/h2d {rates['shm-tensor'] / rates['h2d']:.2f}  ipc/kernel "
                 f"{rates['ipc'] / rates['kernel']:.2f}  ipc-fresh/kernel {rates['ipc-fresh'] / rates['kernel']:.2f}"
                 if gpu else ""))
    for client in clients.values():
        client.close()
    if args.plot:
        plot(rows, names, args.plot)
    latencies(quantd_target, args.metrics_port, spec, gpu, args.calls)


def latencies(target: str, metrics_port: int, spec, gpu: bool, calls: int) -> None:
    """Milliseconds a memory call takes with its header on the server's local socket and through gRPC, in one run:
    a tiny Quantize (64 x 256 bf16), whose time is the call's overhead, a 64 MiB one and on a GPU a 1 GiB one; for
    CUDA IPC beside them the server's own time from launch to done (its quantd_kernel_seconds, mean) and the kernel
    alone in this process (launch and synchronize, median)."""
    import torch

    from quantd.client import QuantdClient
    from quantd.kernels import dispatch

    print(f"# memory calls: median (p90) ms of {calls} Quantize calls (a tenth of them from 64 MiB on), header on the "
          f"local socket or through gRPC")
    for transport in ("shm", "ipc") if gpu else ("shm",):
        for rows in (64, 8192, 131072) if transport == "ipc" else (64, 8192):
            times = {}
            for via in ("local socket", "grpc"):
                with QuantdClient(target, transport=transport, local_socket=via == "local socket") as client:
                    x = torch.randn(rows, 4096 if rows > 64 else 256).bfloat16()
                    x = x.cuda() if transport == "ipc" else client.shm_tensor(x.shape, x.dtype).copy_(x)
                    client.quantize(x, spec, report=False)
                    assert client.last_transport.via == via, (client.last_transport, client.local_socket_reason)
                    server = server_seconds(metrics_port)
                    n = calls if rows == 64 else max(calls // 10, 5)
                    times[via] = median_ms(lambda: client.quantize(x, spec, report=False), n, sync=transport == "ipc")
                    times[via + " server"] = (server_seconds(metrics_port) - server) / n * 1e3
            mib = rows * (4096 if rows > 64 else 256) * 2 / MiB
            line = (f"# {transport} {mib:g} MiB: local socket {times['local socket'][0]:.3f} "
                    f"({times['local socket'][1]:.3f}), grpc {times['grpc'][0]:.3f} ({times['grpc'][1]:.3f})")
            if transport == "ipc":
                out = dispatch.quantize(x, spec)
                kernel = median_ms(lambda: dispatch.quantize(x, spec, out=out), max(calls // 10, 5), sync=True)
                line += (f"; server launch to done {times['local socket server']:.3f}, kernel alone {kernel[0]:.3f}"
                         f" (local socket - kernel alone: {times['local socket'][0] - kernel[0]:.3f})")
            print(line, flush=True)


def median_ms(fn, n: int, sync: bool) -> tuple:
    """(median, p90) milliseconds of fn(), each followed by a device synchronize when `sync`."""
    import statistics

    import torch
    spent = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - started)
    spent.sort()
    return statistics.median(spent) * 1e3, spent[int(0.9 * len(spent))] * 1e3


def server_seconds(metrics_port: int) -> float:
    """The server's quantd_kernel_seconds (sum over its calls so far) for Quantize, from its metrics endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "quantd_kernel_seconds_sum" and s.labels.get("rpc") == "Quantize")


def plot(rows, names, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [size for size, _ in rows]
    for name in names:
        ax.plot(sizes, [rates[name] for _, rates in rows], marker="o", label=name,
                linestyle="--" if name in ("raw", "kernel", "h2d") else "-")
    ax.set(xscale="log", yscale="log", xlabel="tensor size (MiB, bf16)", ylabel="GB/s (input bytes / wall time)",
           title="quantd Quantize by transport")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--chunks-kib", type=int, nargs="+", default=[64, 1024, 4096])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--memory-repeat", type=int, default=10,
                        help="--transports: runs of the memory paths (shm, ipc), the kernel and h2d, best taken")
    parser.add_argument("--format", default="fp8_e4m3")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--transports", action="store_true", help="compare grpc, shm and parallel streams")
    parser.add_argument("--workers", type=int, default=4, help="--transports: server processes and parallel streams")
    parser.add_argument("--plot", help="--transports: write a plot of GB/s against size to this file")
    parser.add_argument("--calls", type=int, default=200, help="--transports: calls timed for each latency figure")
    parser.add_argument("--scaling", type=int, nargs="+", metavar="N",
                        help="parallel streams for each N against N raw byte streams in parallel processes")
    parser.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--raw-client", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        return raw_server(args.raw_server)
    if args.raw_client:
        return raw_client(*args.raw_client)
    if args.scaling:
        return scaling_main(args, {**os.environ, "PYTHONUNBUFFERED": "1"})

    import torch

    from quantd.client import QuantdClient
    from quantd.protocol import wire
    from quantd.kernels import dispatch
    from quantd.kernels.spec import QuantSpec

    raw_port, quantd_port, args.metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    servers = [subprocess.Popen([sys.executable, __file__, "--raw-server", str(raw_port)], env=env),
               subprocess.Popen([sys.executable, "-m", "quantd.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(quantd_port), "--device", args.device, "--log-format", "json",
                                 "--metrics-port", str(args.metrics_port)],
                                env=env, stderr=subprocess.DEVNULL)]
    try:
        raw_target, quantd_target = f"127.0.0.1:{raw_port}", f"127.0.0.1:{quantd_port}"
        wait_ready(raw_target)
        wait_ready(quantd_target)
        if args.transports:
            args.ports = (raw_port, quantd_port)
            return transports_main(args, servers, env)
        spec = QuantSpec(args.format, group_size=args.group)
        raw_channel = grpc.insecure_channel(raw_target, options=[("grpc.max_receive_message_length", -1)])
        with QuantdClient(quantd_target) as probe:
            info = probe.server_info()
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  server backend={info['backend']} "
              f"device={info['device']}  grpc {grpc.__version__}  torch {torch.__version__}  cpus {os.cpu_count()}")
        print(f"# spec {spec.describe()}, bf16 input, report off, checksums off; GB/s = input bytes / wall time")
        print(f"{'size MiB':>8} {'chunk KiB':>9} {'raw GB/s':>9} {'quantd GB/s':>11} {'ratio':>6}")
        for size in args.sizes_mib:
            x = torch.randn(size * MiB // 2 // 4096, 4096).bfloat16()
            data = wire.tensor_bytes(x)
            local = dispatch.quantize(x[:256], spec)  # result check below compares a slice bit for bit
            for chunk_kib in args.chunks_kib:
                chunk = chunk_kib * 1024
                raw = best_rate(lambda: raw_call(raw_channel, data, chunk), len(data), args.repeat)
                with QuantdClient(quantd_target, chunk_bytes=chunk) as client:
                    client.quantize(x[:4096], spec, report=False)  # warm: the server compiles per shape family
                    result = {}
                    rate = best_rate(lambda: result.update(q=client.quantize(x, spec, report=False)), len(data), args.repeat)
                assert torch.equal(result["q"].codes[:256].view(torch.uint8), local.codes.view(torch.uint8))
                print(f"{size:>8} {chunk_kib:>9} {raw:>9.2f} {rate:>11.2f} {rate / raw:>6.2f}", flush=True)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)


if __name__ == "__main__":
    main()
