"""The local socket: memory calls from a client on the server's host without gRPC's round trip (server.local,
client.local). Real servers on 127.0.0.1, the real client, and raw connections for what a hostile client sends."""
from __future__ import annotations

import os
import socket
import stat
import time

import grpc
import pytest
import torch

from quantd.client import QuantdClient, QuantdError
from quantd.kernels import QuantSpec, quantize
from quantd.protocol import local, wire
from quantd.server import local as server_local
from quantd.server import servicer
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.v1 import quantd_pb2 as pb

SERVICE = "quantd.v1.Quantd"


@pytest.fixture()
def server():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


def calls(server, rpc: str, code: str = "OK") -> float:
    return server.server.metrics.registry.get_sample_value(
        "quantd_requests_total", {"service": SERVICE, "rpc": rpc, "code": code}) or 0


def raw_call(path: str, body: bytes, length: int | None = None) -> pb.LocalResponse:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(30)
        try:
            sock.sendall((len(body) if length is None else length).to_bytes(4, "little") + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading (a connection past the bound): the answer is still queued
        n = local.length(local.recv_exactly(sock, 4))
        return pb.LocalResponse.FromString(local.recv_exactly(sock, n))


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def assert_code(response: pb.LocalResponse, code: grpc.StatusCode, words: str) -> None:
    assert response.code == code.value[0], response
    assert words in response.details


def test_memory_calls_go_on_the_local_socket_bit_identical_to_grpc(server):
    x, spec = torch.randn(64, 256), QuantSpec("fp8_e4m3", group_size=128)
    b = torch.randn(32, 256)
    want = quantize(x, spec)
    results = {}
    for use in (True, False):
        with QuantdClient(server.target, transport="shm", local_socket=use) as client:
            before = calls(server, "QuantizeInMemory")
            got = client.quantize(x, spec, report=False)
            assert got.transport.via == ("local socket" if use else "grpc"), client.local_socket_reason
            assert calls(server, "QuantizeInMemory") == before + 1  # recorded under the RPC's name either way
            deq = client.dequantize(got)
            assert client.last_transport.via == got.transport.via
            mm = client.matmul(x, b, a_spec=spec, b_spec=spec)
            assert client.last_transport.via == got.transport.via
            results[use] = (got, deq, mm)
    for got, deq, mm in results.values():
        assert torch.equal(got.codes.view(torch.uint8), want.codes.view(torch.uint8))
        assert torch.equal(got.scales, want.scales)
        assert torch.equal(deq, want.dequantize())
    assert torch.equal(results[True][2], results[False][2])


def test_the_socket_is_the_owners_alone_and_goes_with_the_server():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu")) as running:
        path = running.server.servicer.local_socket
        assert path and stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with QuantdClient(running.target) as client:
            assert client.server_info()["local_socket"] == path
    assert not os.path.exists(path)


def test_a_server_without_a_local_socket_is_called_through_grpc():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", local_socket_dir="off")) as running:
        assert running.server.servicer.local_socket == ""
        with QuantdClient(running.target, transport="shm") as client:
            x, spec = torch.randn(8, 64), QuantSpec("int8_sym", granularity="channel")
            got = client.quantize(x, spec, report=False)
            assert got.transport == got.transport.__class__("shm", "asked for", "grpc")
            assert client.local_socket_reason == "the server has no local socket"
            assert torch.equal(got.codes, quantize(x, spec).codes)


def test_a_socket_the_client_cannot_reach_falls_back_to_grpc(server, tmp_path):
    with QuantdClient(server.target, transport="shm") as client:
        x, spec = torch.randn(8, 64), QuantSpec("fp8_e5m2", group_size=32)
        client._shm_reason()
        client._local_path = str(tmp_path / "elsewhere.sock")  # as a server in another container names its own
        got = client.quantize(x, spec, report=False)
        assert got.transport.via == "grpc" and "cannot connect" in client.local_socket_reason
        assert torch.equal(got.codes.view(torch.uint8), quantize(x, spec).codes.view(torch.uint8))


def test_a_socket_that_goes_away_between_calls_is_retried_through_grpc(server):
    with QuantdClient(server.target, transport="shm") as client:
        x, spec = torch.randn(8, 64), QuantSpec("int8_sym", group_size=32)
        assert client.quantize(x, spec, report=False).transport.via == "local socket"
        server.call(server.server.local.stop())  # its connections closed, its file gone
        got = client.quantize(x, spec, report=False)  # UNAVAILABLE on the idle connection, retried
        assert got.transport.via == "grpc" and "cannot connect" in client.local_socket_reason
        assert torch.equal(got.codes, quantize(x, spec).codes)


def test_hostile_requests_get_a_status_each_and_the_server_keeps_serving(server):
    path = server.server.servicer.local_socket
    assert_code(raw_call(path, b"\xff\xff\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, "not a LocalRequest")
    assert_code(raw_call(path, b""), grpc.StatusCode.INVALID_ARGUMENT, "no header")
    spec = QuantSpec("fp8_e4m3", group_size=32)
    header = pb.QuantizeHeader(tensor=pb.TensorInfo(name="x", dtype="float32", shape=[8, 64]))
    header.spec.CopyFrom(wire.spec_to_proto(spec))
    assert_code(raw_call(path, local.request("Quantize", header).SerializeToString()),
                grpc.StatusCode.INVALID_ARGUMENT, "must be in shared-memory regions or CUDA memory")
    header.regions.session = "0" * 32
    header.regions.inputs.add(region="nope", offset=0, size=8 * 64 * 4)
    header.regions.outputs.add(region="nope", offset=4096, size=8 * 64)  # codes
    header.regions.outputs.add(region="nope", offset=8192, size=8 * 2 * 4)  # scales
    assert_code(raw_call(path, local.request("Quantize", header).SerializeToString()),
                grpc.StatusCode.NOT_FOUND, "unknown session")
    too_long = server.server.config.max_message_bytes + 1
    assert_code(raw_call(path, b"", length=too_long), grpc.StatusCode.RESOURCE_EXHAUSTED, "over this server's")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a frame cut short, and gone
        sock.connect(path)
        sock.sendall((1000).to_bytes(4, "little") + b"\x0a\x02")
    with QuantdClient(server.target, transport="shm") as client:
        x, spec = torch.randn(16, 64), QuantSpec("mxfp8")
        got = client.quantize(x, spec, report=False)
        assert got.transport.via == "local socket"
        assert torch.equal(got.codes.view(torch.uint8), quantize(x, spec).codes.view(torch.uint8))
    assert calls(server, "QuantizeInMemory", "NOT_FOUND") == 1 and calls(server, "LocalRequest", "INVALID_ARGUMENT") == 2


def test_a_call_past_its_deadline_drops_its_connection_and_the_next_call_gets_a_new_one(server, monkeypatch):
    with QuantdClient(server.target, transport="shm", retries=0) as client:
        x, spec = torch.randn(2048, 4096), QuantSpec("int8_asym", group_size=128)
        shared_x = client.shm_tensor(x.shape, x.dtype)
        shared_x.copy_(x)
        client.quantize(shared_x[:8], spec, report=False)
        first = client._local_idle[0]
        # The server's quantize made slow: on a busy 2-core machine the client's 1 ms wait could otherwise end only
        # after the answer had come, and take it.
        slow = servicer.quantize_amax
        monkeypatch.setattr(servicer, "quantize_amax", lambda *args, **kw: (time.sleep(0.2), slow(*args, **kw))[1])
        with pytest.raises(QuantdError) as failed:
            client.quantize(shared_x, spec, report=False, timeout=0.001)
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first.sock is None and client._local_idle == []  # its late answer is never read as another call's
        got = client.quantize(shared_x, spec, report=False)
        assert got.transport.via == "local socket" and client._local_idle and client._local_idle[0] is not first
        want = quantize(x, spec)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.zero_points, want.zero_points)


def test_connections_past_the_bound_are_refused_and_the_served_ones_go_on(server, monkeypatch):
    path = server.server.servicer.local_socket
    monkeypatch.setattr(server_local, "MAX_CONNECTIONS", 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(path)
        for _ in range(2):  # served, twice on one connection
            held.sendall((0).to_bytes(4, "little"))
            n = local.length(local.recv_exactly(held, 4))
            assert_code(pb.LocalResponse.FromString(local.recv_exactly(held, n)), grpc.StatusCode.INVALID_ARGUMENT,
                        "no header")
        assert_code(raw_call(path, b""), grpc.StatusCode.RESOURCE_EXHAUSTED, local.BUSY)
        with QuantdClient(server.target, transport="shm") as client:  # its call goes through gRPC instead
            x, spec = torch.randn(8, 64), QuantSpec("fp8_e4m3", group_size=32)
            got = client.quantize(x, spec, report=False)
            assert got.transport.via == "grpc" and client._local_idle == []
            assert torch.equal(got.codes.view(torch.uint8), quantize(x, spec).codes.view(torch.uint8))
    wait_for(lambda: not server.server.local.connections)
    assert_code(raw_call(path, b""), grpc.StatusCode.INVALID_ARGUMENT, "no header")


def test_a_connection_refused_before_its_call_is_sent_reads_busy(server, monkeypatch):
    """The server answers a connection past its bound and closes it at once; a call sent after that close meets a
    broken pipe, yet reads the queued answer (RESOURCE_EXHAUSTED, so QuantdClient goes on through gRPC)."""
    import select
    from quantd.client.local import LocalSocket, LocalSocketError
    path = server.server.servicer.local_socket
    monkeypatch.setattr(server_local, "MAX_CONNECTIONS", 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(path)
        held.sendall((0).to_bytes(4, "little"))  # answered: the server holds this connection
        local.recv_exactly(held, local.length(local.recv_exactly(held, 4)))
        refused = LocalSocket(path)
        poll = select.poll()
        poll.register(refused.sock, select.POLLIN)
        wait_for(lambda: any(event & select.POLLHUP for _, event in poll.poll(10)))  # closed by the server
        with pytest.raises(LocalSocketError) as caught:
            refused.call("Quantize", pb.QuantizeHeader(), 30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and local.BUSY in caught.value.details()
        assert refused.sock is not None  # not broken by the pipe: the caller closes it


def test_random_frames_on_many_connections_never_stop_the_server(server):
    """Hundreds of frames of random bytes (valid lengths, garbage bodies, LocalRequests with random headers, cut
    short and abandoned) on connections opened side by side with a real client's calls: each complete frame gets a
    status, the client's calls stay right, and nothing is left open."""
    import random
    import threading
    path = server.server.servicer.local_socket
    rng = random.Random(7)
    x, spec = torch.randn(32, 128), QuantSpec("fp8_e4m3", group_size=64)
    want = quantize(x, spec)
    errors = []

    def fuzz(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(40):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(path)
                    sock.settimeout(30)
                    kind = rnd.randrange(4)
                    if kind == 0:
                        body = rnd.randbytes(rnd.randrange(0, 300))
                    elif kind == 1:  # a well-formed message with random header fields
                        header = pb.QuantizeHeader(tensor=pb.TensorInfo(dtype=rnd.choice(["bfloat16", "int7", ""]),
                                                                        shape=[rnd.randrange(-2, 9)] * rnd.randrange(3)))
                        header.regions.session = rnd.randbytes(8).hex()
                        body = local.request("Quantize", header).SerializeToString() if rnd.random() < 0.8 else \
                            rnd.choice([pb.LocalRequest(matmul=pb.MatmulHeader()),
                                        pb.LocalRequest(dequantize=pb.DequantizeHeader())]).SerializeToString()
                    else:
                        body = rnd.randbytes(rnd.randrange(1, 64))
                    if kind == 3:  # cut short and gone
                        sock.sendall((len(body) + 100).to_bytes(4, "little") + body)
                        continue
                    sock.sendall(len(body).to_bytes(4, "little") + body)
                    n = local.length(local.recv_exactly(sock, 4))
                    response = pb.LocalResponse.FromString(local.recv_exactly(sock, n))
                    if response.code == 0:
                        errors.append(f"a random frame was answered OK: {body!r}")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=fuzz, args=(rng.randrange(1 << 30),)) for _ in range(6)]
    for thread in threads:
        thread.start()
    with QuantdClient(server.target, transport="shm") as client:
        for _ in range(20):
            got = client.quantize(x, spec, report=False)
            assert got.transport.via == "local socket"
            assert torch.equal(got.codes.view(torch.uint8), want.codes.view(torch.uint8))
    for thread in threads:
        thread.join()
    assert errors == []
    wait_for(lambda: not server.server.local.connections)
    assert server.server.servicer.active_streams == 0 and not server.server.servicer.regions.regions
