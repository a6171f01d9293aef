"""What hostile or failing clients do to a `quantd serve` process (CPU, on 127.0.0.1).

    python benchmarks/hostile.py [--declared-mib 1024] [--sent-mib 0] [--idle-streams 200]
                                 [--frames 10000] [--only aborted admission frozen shrink local]

aborted    three Quantize streams that send a header declaring --declared-mib of bf16 and --sent-mib of it,
           cancelled one by one (staging pool off): the server's RSS after each and 5 s after the last.
admission  --idle-streams streams that send nothing, then as many that send a header and then nothing, held
           open; each time, another client's Quantize (1 s apart until one succeeds, for up to 60 s): its
           status and when it succeeded.
frozen     two servers, one SIGSTOPped; a client over both quantizes 6 small tensors (timeout 15 s): the
           longest call and the failures.
shrink     a client registers a named 512 MiB /dev/shm region and shrinks it to 4 KiB 0.3 s into a Quantize of
           the 256 MiB in it, against a server with --shm-unsealed refuse (the default) and allow: the
           registration's or the call's status and whether the server survived; then quantd's own client's
           sealed region, which ftruncate cannot shrink.
local      --frames random frames on the server's local socket (random bytes, LocalRequests with random headers,
           lengths past the limit, frames cut short) from 16 threads, each frame on a connection of its own,
           beside a real client's shm calls: the statuses the frames got, whether every client call was right,
           the server's RSS before and after, and its open connections once they are gone.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory

import grpc
import torch

from quantd.client import QuantdClient, QuantdError
from quantd.kernels.spec import QuantSpec
from quantd.protocol import local, wire
from quantd.server.healthcheck import check
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

MiB = 1 << 20
SPEC = QuantSpec("fp8_e4m3", group_size=128)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "quantd.server", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--device", "cpu", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if check(self.target, timeout=1.0) == "SERVING":
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("quantd serve did not start")
            time.sleep(0.1)

    def rss_gib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kib / (1 << 20)

    def close(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def held_stream(channel, nbytes: int, stop: threading.Event, sent: int = 0, header: bool = True):
    """A Quantize call that sends a header declaring `nbytes` of bf16 input and `sent` bytes of it, then nothing
    until `stop` (header=False: sends nothing at all)."""
    info = wire.tensor_info("input", torch.bfloat16, (nbytes // 2,))
    piece = bytes(4 * MiB)

    def requests():
        if header:
            yield pb.QuantizeRequest(header=pb.QuantizeHeader(tensor=info, spec=wire.spec_to_proto(SPEC)))
        for offset in range(0, sent, len(piece)):
            yield pb.QuantizeRequest(chunk=pb.Chunk(offset=offset, data=piece))
        stop.wait()
    return channel.stream_stream("/quantd.v1.Quantd/Quantize", request_serializer=pb.QuantizeRequest.SerializeToString,
                                 response_deserializer=pb.QuantizeResponse.FromString)(requests(), timeout=600)


def aborted(declared_mib: int, sent_mib: int) -> None:
    server = Server("--staging-pool-bytes", "0")
    try:
        print(f"aborted: RSS at start {server.rss_gib():.2f} GiB")
        with grpc.insecure_channel(server.target) as channel:
            for i in range(3):
                stop = threading.Event()
                call = held_stream(channel, declared_mib * MiB, stop, sent_mib * MiB)
                time.sleep(1.5 + sent_mib / 256)
                call.cancel()
                stop.set()
                time.sleep(1.0)
                print(f"aborted: after stream {i + 1} cancelled: RSS {server.rss_gib():.2f} GiB")
        time.sleep(5)
        print(f"aborted: 5 s later: RSS {server.rss_gib():.2f} GiB")
    finally:
        server.close()


def admission(count: int) -> None:
    server = Server()
    x = torch.randn(256, 1024).to(torch.bfloat16)
    try:
        with QuantdClient(server.target, timeout=300) as client:
            client.quantize(x, SPEC)  # compiled before the clock starts
        for header in (False, True):
            stop = threading.Event()
            with grpc.insecure_channel(server.target) as channel:
                calls = [held_stream(channel, 64 * MiB, stop, header=header) for _ in range(count)]
                time.sleep(1)
                started, outcomes = time.monotonic(), []
                while time.monotonic() - started < 60:
                    try:
                        with QuantdClient(server.target, timeout=60, retries=0) as client:
                            client.quantize(x, SPEC)
                        outcomes.append("OK")
                        break
                    except QuantdError as exc:
                        outcomes.append(exc.code.name)
                    time.sleep(1)
                kind = "header-only" if header else "silent"
                print(f"admission: {count} {kind} streams held: another client's Quantize {outcomes[-1]} after "
                      f"{time.monotonic() - started:.1f} s ({len(outcomes)} tries); server RSS {server.rss_gib():.2f} GiB")
                stop.set()
                for call in calls:
                    call.cancel()
    finally:
        server.close()


def frozen() -> None:
    servers = [Server(), Server()]
    try:
        x = torch.randn(128, 1024).to(torch.bfloat16)
        for server in servers:  # each compiles its kernel before the test
            with QuantdClient(server.target, timeout=300) as one:
                one.quantize(x, SPEC, report=False)
        os.kill(servers[1].proc.pid, signal.SIGSTOP)
        times, failures = [], []
        with QuantdClient([s.target for s in servers], timeout=15) as client:
            for _ in range(6):
                started = time.monotonic()
                try:
                    client.quantize(x, SPEC, report=False)
                except QuantdError as exc:
                    failures.append(exc.code.name)
                times.append(time.monotonic() - started)
        print(f"frozen: 6 calls over 2 replicas, one frozen: longest {max(times):.1f} s, "
              f"total {sum(times):.1f} s, failures {failures}")
    finally:
        for server in servers:
            server.close()


def shrink() -> None:
    for mode in ("refuse", "allow"):
        server = Server("--shm-unsealed", mode)
        obj = shared_memory.SharedMemory(f"quantd-hostile-{os.getpid()}", create=True, size=512 * MiB)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = quantd_pb2_grpc.QuantdStub(channel)
                session_call = stub.OpenSession(pb.OpenSessionRequest())
                session = next(session_call).session
                nonce = os.urandom(32)
                obj.buf[:32] = nonce
                try:
                    region = stub.RegisterRegion(pb.RegisterRegionRequest(session=session, name=obj.name,
                                                                          size=512 * MiB, nonce=nonce)).region
                except grpc.RpcError as exc:
                    print(f"shrink ({mode}): registration {exc.code().name}: {exc.details()}")
                    continue
                rows = 256 * MiB // 2 // 4096
                at = [4096, 4096 + 256 * MiB, 4096 + 256 * MiB + rows * 4096]
                sizes = [256 * MiB, rows * 4096, rows * 32 * 4]
                refs = [pb.RegionRef(region=region, offset=o, size=n) for o, n in zip(at, sizes)]
                header = pb.QuantizeHeader(tensor=wire.tensor_info("x", torch.bfloat16, (rows, 4096)),
                                           spec=wire.spec_to_proto(SPEC),
                                           regions=pb.RegionTensors(session=session, inputs=refs[:1], outputs=refs[1:]))
                timer = threading.Timer(0.3, os.truncate, (f"/dev/shm/{obj.name}", 4096))
                timer.start()
                try:
                    list(stub.Quantize(iter([pb.QuantizeRequest(header=header)]), timeout=120))
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name
                timer.join()
                time.sleep(1.0)
                alive = server.proc.poll() is None
                print(f"shrink ({mode}): the call {status}; server {'alive' if alive else f'died, exit {server.proc.returncode}'}")
                session_call.cancel()
        finally:
            obj.close()
            obj.unlink()
            server.close()
    server = Server()
    try:
        with QuantdClient(server.target, transport="shm") as client:
            x = client.shm_tensor((4096, 4096), torch.bfloat16)
            client.quantize(x, SPEC, report=False)
            memory = client._shm.user_regions[0].memory
            try:
                os.ftruncate(memory.fd, 4096)
                print("shrink (quantd's client): the sealed region shrank")
            except OSError as exc:
                print(f"shrink (quantd's client): ftruncate of the sealed region: {exc.strerror}")
    finally:
        server.close()


def local_frames(frames: int) -> None:
    import collections
    import random
    server = Server()
    try:
        with QuantdClient(server.target) as probe:
            path = probe.server_info()["local_socket"]
        statuses, failures, lock = collections.Counter(), [], threading.Lock()

        def frame(rnd: random.Random) -> tuple:
            """(bytes to send, whether the server answers them: not for a frame cut short)."""
            kind = rnd.randrange(5)
            if kind == 0:
                body = rnd.randbytes(rnd.randrange(0, 512))
            elif kind == 1:
                header = pb.QuantizeHeader(tensor=pb.TensorInfo(dtype=rnd.choice(["bfloat16", "float32", "int7"]),
                                                                shape=[rnd.randrange(-1, 1 << 20)] * rnd.randrange(4)))
                header.spec.format = rnd.choice(["fp8_e4m3", "mxfp4", "nope"])
                header.regions.session = rnd.randbytes(16).hex()
                header.regions.inputs.add(region=rnd.randbytes(8).hex(), offset=rnd.randrange(-5, 1 << 40),
                                          size=rnd.randrange(-5, 1 << 40))
                body = local.request("Quantize", header).SerializeToString()
            elif kind == 2:
                header = pb.DequantizeHeader()
                header.cuda.session = rnd.randbytes(16).hex()
                header.cuda.inputs.add(handle=rnd.randbytes(64), storage_bytes=rnd.randrange(1 << 30))
                body = local.request("Dequantize", header).SerializeToString()
            elif kind == 3:
                return (1 << 31).to_bytes(4, "little"), True  # a length past the limit
            else:
                body = rnd.randbytes(rnd.randrange(1, 256))
                return (len(body) + 1000).to_bytes(4, "little") + body, False  # cut short
            return len(body).to_bytes(4, "little") + body, True

        def fuzz(seed: int, count: int) -> None:
            rnd = random.Random(seed)
            for _ in range(count):
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.connect(path)
                        sock.settimeout(30)
                        data, answered = frame(rnd)
                        sock.sendall(data)
                        if not answered:
                            name = "cut short"
                        else:
                            length = local.length(local.recv_exactly(sock, 4))
                            code = pb.LocalResponse.FromString(local.recv_exactly(sock, length)).code
                            name = grpc.StatusCode.OK.name if code == 0 else \
                                next(c.name for c in grpc.StatusCode if c.value[0] == code)
                except Exception as exc:  # noqa: BLE001
                    name = f"client side: {type(exc).__name__}"
                with lock:
                    statuses[name] += 1

        threads = [threading.Thread(target=fuzz, args=(i, frames // 16)) for i in range(16)]
        calls = 0
        with QuantdClient(server.target, transport="shm") as client:
            x = torch.randn(256, 1024).bfloat16()
            want = quantize_bytes(x)
            for _ in range(3):  # the session open, its regions mapped and the shape compiled before the frames
                client.quantize(x, SPEC, report=False)
            rss_before = server.rss_gib()
            started = time.monotonic()
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) or calls < 20:
                got = client.quantize(x, SPEC, report=False)
                calls += 1
                if got.transport.via != "local socket" or quantize_bytes_of(got) != want:
                    failures.append(f"call {calls}: {got.transport}")
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        time.sleep(1)
        with QuantdClient(server.target) as probe:
            alive = probe.server_info()["local_socket"] == path
        print(f"local: {sum(statuses.values())} frames in {seconds:.1f} s from 16 threads: {dict(statuses)}; "
              f"{calls} client calls beside them, {len(failures)} wrong or not on the socket; server serving after: "
              f"{alive}; RSS {rss_before:.3f} -> {server.rss_gib():.3f} GiB", flush=True)
    finally:
        server.close()


def quantize_bytes(x: torch.Tensor) -> bytes:
    from quantd.kernels import quantize
    return quantize_bytes_of(quantize(x, SPEC))


def quantize_bytes_of(qt) -> bytes:
    return qt.codes.view(torch.uint8).numpy().tobytes() + qt.scales.numpy().tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--declared-mib", type=int, default=1024)
    parser.add_argument("--sent-mib", type=int, default=0)
    parser.add_argument("--idle-streams", type=int, default=200)
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--only", nargs="*", default=["aborted", "admission", "frozen", "shrink", "local"])
    args = parser.parse_args()
    if "aborted" in args.only:
        aborted(args.declared_mib, args.sent_mib)
    if "admission" in args.only:
        admission(args.idle_streams)
    if "frozen" in args.only:
        frozen()
    if "shrink" in args.only:
        shrink()
    if "local" in args.only:
        local_frames(args.frames)


if __name__ == "__main__":
    main()
