"""Shared-memory regions and parallel streams, end to end through real servers (in this process and `quantd serve`).

Every result is compared bit for bit with quantd.kernels on this machine; every violation of a region's bounds,
ownership or same-host proof gets its status, and the server keeps serving and releases what it mapped.
"""
import concurrent.futures
import fcntl
import gc
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import pytest
import torch
from grpc_harness import ServerProcess, free_port, quantd_command

from quantd.client import QuantdClient, QuantdError
from quantd.client.transports import MIN_REGION_BYTES, Choice
from quantd.kernels import QuantSpec, quantize
from quantd.protocol import regions, wire
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

INVALID, DENIED, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
SPECS = [QuantSpec("fp8_e4m3", group_size=64), QuantSpec("int8_asym", granularity="channel"),
         QuantSpec("mxfp4"), QuantSpec("fp8_e5m2", granularity="tile", tile=(8, 32)),
         QuantSpec("int8_sym", granularity="flat", block_size=96), QuantSpec("fp8_e4m3", granularity="tensor"),
         QuantSpec("nvfp4")]


@pytest.fixture(scope="module")
def server():
    """Takes named /dev/shm objects too (the tests below make those by hand); quantd's client registers sealed
    memory files."""
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", piece_bytes=4096, shm_unsealed="allow")
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def sealed_server():
    """The default: only memory sealed against shrinking is taken."""
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


def server_regions(server) -> int:
    return len(server.server.servicer.regions.regions)


def assert_same(got, want):
    assert list(got.stored()) == list(want.stored())
    for name in want.stored():
        a, b = getattr(got, name), getattr(want, name)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert same_bits(a, b), name


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8).cpu(), b.reshape(-1).view(torch.uint8).cpu())


def wait_for(condition, seconds=30.0, why=lambda: ""):
    """Wait until condition() holds; why() says what was seen when it does not in time."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in time {why()}"
        time.sleep(0.05)


# ---- shared memory: results ------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_shm_quantize_dequantize_matmul_match_the_kernels(server, spec):
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = quantize(x, spec)
    with QuantdClient(server.target, transport="shm") as client:
        got = client.quantize(x, spec, dequantized=True)
        assert got.transport.transport == "shm"
        assert_same(got, want)
        assert torch.equal(got.dequantized, want.dequantize())
        assert got.report == QuantdClient(server.target).quantize(x, spec).report
        assert torch.equal(client.dequantize(got, torch.float32), want.dequantize(torch.float32))
        assert client.last_transport.transport == "shm"
        if spec is SPECS[0]:
            a = torch.randn(8, 96).bfloat16()
            assert torch.equal(client.matmul(a, got, a_spec=QuantSpec("fp8_e4m3", group_size=32)),
                               QuantdClient(server.target).matmul(a, got, a_spec=QuantSpec("fp8_e4m3", group_size=32)))
    wait_for(lambda: server_regions(server) == 0)


def test_shm_tensor_is_read_where_it_is(server):
    x = torch.randn(1024, 1024).bfloat16()  # 2 MiB: it would not fit the 1 MiB scratch region
    spec = QuantSpec("fp8_e4m3")
    with QuantdClient(server.target, transport="shm") as client:
        shared_x = client.shm_tensor(x.shape, x.dtype)
        shared_x.copy_(x)
        assert_same(client.quantize(shared_x, spec, report=False), quantize(x, spec))
        sizes = sorted(r["size"] for r in client.region_status()["regions"])
        # the scratch region kept its 1 MiB: the input was not copied into it, and the outputs (1 MiB of codes and
        # the scales) went to a result region of their size; the tensor's own region holds the nonce too
        outputs = regions.layout([1 << 20, 1024 * 8 * 4], regions.ALIGN)[1]
        assert sizes == [1 << 20, outputs, (2 << 20) + regions.ALIGN]
    wait_for(lambda: server_regions(server) == 0)


def test_only_streams_that_received_chunks_trim_the_heap(server, monkeypatch):
    """A large stream gives back the heap its chunk messages left; a memory call allocates no chunks and answers
    without that pause (malloc_trim walks every arena: a large part of a fast call's time)."""
    from quantd.server import streams
    trims = []
    monkeypatch.setattr(streams, "TRIM_BYTES", 1)
    monkeypatch.setattr(streams, "trim_heap", lambda: trims.append(1))
    x, spec = torch.randn(64, 256).bfloat16(), QuantSpec("fp8_e4m3")
    with QuantdClient(server.target, transport="shm") as client:
        assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
        assert client.last_transport.transport == "shm" and trims == []
    with QuantdClient(server.target, transport="grpc") as client:
        assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
    assert trims == [1]


def test_memory_calls_are_unary_and_refuse_tensors_in_the_stream(server):
    x, spec = torch.randn(8, 64), QuantSpec("fp8_e4m3", group_size=32)
    with QuantdClient(server.target, transport="shm") as client:
        assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
        assert client._unary_in_memory
        header = pb.QuantizeHeader(tensor=wire.tensor_info("x", torch.float32, (8, 64)), spec=wire.spec_to_proto(spec))
        assert code_of(lambda: client.stub.QuantizeInMemory(header)) == (
            INVALID, "QuantizeInMemory: the header's tensors must be in shared-memory regions or CUDA memory (its "
                     "`regions` or `cuda`); send their bytes with Quantize")


def test_a_server_without_the_unary_memory_calls_is_served_by_streams(monkeypatch):
    from quantd.server.servicer import QuantdServicer

    async def unimplemented(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    for rpc in ("QuantizeInMemory", "DequantizeInMemory", "MatmulInMemory", "CloseSession"):
        monkeypatch.setattr(QuantdServicer, rpc, unimplemented)  # as a server from before them answers
    x, spec = torch.randn(8, 64), QuantSpec("fp8_e4m3", group_size=32)
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", local_socket_dir="off")) as old:
        with QuantdClient(old.target, transport="shm") as client:
            got = client.quantize(x, spec, report=False)
            assert got.transport.transport == "shm" and not client._unary_in_memory
            assert_same(got, quantize(x, spec))
            assert torch.equal(client.dequantize(got), quantize(x, spec).dequantize())
            assert server_regions(old) == 3  # scratch and a result region for each call
        assert server_regions(old) == 0  # closed region by region, as before CloseSession


def test_a_memory_call_cancelled_as_its_session_ends_leaves_the_server_serving():
    """The client cancels a Quantize in its regions while the server computes, and ends its session at once: the
    regions are released under the computation, which must still find them mapped (the server used to crash)."""
    server = ServerProcess()
    try:
        x, spec = torch.randn(8192, 16384).bfloat16(), QuantSpec("fp8_e4m3", group_size=128)
        client = QuantdClient(server.target, transport="shm")
        shared_x = client.shm_tensor(x.shape, x.dtype)
        shared_x.copy_(x)

        def cancelled(header):
            call = client.stub.QuantizeInMemory.future(header)
            time.sleep(0.05)  # the server computes: 256 MiB take longer than that on the CPU backend
            call.cancel()
            raise RuntimeError("cancelled")
        with pytest.raises(RuntimeError):
            client._shm.call_with(cancelled, client._quantize_header(shared_x, spec, None, False), [shared_x],
                                  wire.quantize_outputs(spec, x.shape, False))
        client.close()
        del shared_x
        small = torch.randn(64, 256)
        with QuantdClient(server.target, transport="shm") as other:
            assert_same(other.quantize(small, spec, report=False), quantize(small, spec))
        assert server.proc.poll() is None
    finally:
        server.close()


def test_shm_results_are_handed_over_without_a_copy_and_stay_intact(server):
    """Outputs land in a result region whose mapping the returned tensors keep: no copy out of scratch. A region
    serves another call only once no result of its last call is alive, so results held by the caller never change;
    with every result region held, outputs are copied out of scratch instead."""
    spec = QuantSpec("fp8_e4m3")
    xs = [torch.randn(64, 256, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(8)]
    with QuantdClient(server.target, transport="shm") as client:
        held = [client.quantize(x, spec, report=False) for x in xs]  # more than MAX_RESULT_REGIONS alive at once
        for x, got in zip(xs, held):
            assert_same(got, quantize(x, spec))
        transport = client._shm
        limit = transport.MAX_RESULT_REGIONS
        assert len(transport.result_regions) == limit
        # a result in a region shares the region's whole mapping; one copied out of scratch has storage of its own
        in_region = [got.codes.untyped_storage().nbytes() >= MIN_REGION_BYTES for got in held]
        assert in_region == [True] * limit + [False] * (len(xs) - limit)
        del held, got
        for _ in range(3):  # results dropped at once: the same regions serve every call, none is added
            for x in xs[:2]:
                assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
        assert len(transport.result_regions) == limit
        assert client.region_status()["server_regions"] == limit + 1  # and the scratch region
    wait_for(lambda: server_regions(server) == 0)


def test_a_shm_tensor_outlives_its_client(server):
    """A tensor from shm_tensor() and a result kept past client.close() stay readable: the regions are released on
    the server, and this process unmaps them only when the last view goes (an unmapped one would crash here)."""
    x = torch.randn(64, 256).bfloat16()
    with QuantdClient(server.target, transport="shm") as client:
        shared_x = client.shm_tensor(x.shape, x.dtype)
        shared_x.copy_(x)
        got = client.quantize(shared_x, QuantSpec(), report=False)
    wait_for(lambda: server_regions(server) == 0)
    assert torch.equal(shared_x, x)
    assert_same(got, quantize(x, QuantSpec()))
    shared_x += 1  # still writable memory of this process
    assert torch.equal(shared_x, x + 1)


def test_auto_takes_shm_on_this_host_and_says_so(server):
    with QuantdClient(server.target, transport="auto") as client:
        x = torch.randn(16, 128).bfloat16()
        assert_same(client.quantize(x), quantize(x, QuantSpec()))
        assert (client.last_transport.transport, client.last_transport.reason) == ("shm", "the server shares this host")
    with pytest.raises(ValueError, match="transport must be one of"):
        QuantdClient(server.target, transport="carrier-pigeon")


def test_a_server_down_at_first_still_gets_shm_once_it_is_up():
    """UNAVAILABLE when the client first asks for a session is not remembered (a server on another host is)."""
    port = free_port()
    client = QuantdClient(f"127.0.0.1:{port}", transport="auto")
    assert "UNAVAILABLE" in client._shm_reason()
    serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--cpu-compile", "off"]
    proc = subprocess.Popen(quantd_command() + serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with client:
            grpc.channel_ready_future(client.channel).result(timeout=120)
            x = torch.randn(16, 128).bfloat16()
            assert_same(client.quantize(x), quantize(x, QuantSpec()))
            assert client.last_transport.transport == "shm"
    finally:
        proc.terminate()
        proc.wait(60)


# ---- shared memory: violations --------------------------------------------------------

class RawSession:
    """A session opened through the generated stub, and helpers to make regions and requests by hand."""

    def __init__(self, target):
        self.channel = grpc.insecure_channel(target)
        self.stub = quantd_pb2_grpc.QuantdStub(self.channel)
        self.call = self.stub.OpenSession(pb.OpenSessionRequest())
        self.session = next(self.call).session
        self.objects = []

    def shm(self, size, nonce=None):
        obj = shared_memory.SharedMemory(f"quantd-test-{secrets.token_hex(6)}", create=True, size=size)
        nonce = nonce or secrets.token_bytes(regions.NONCE_BYTES)
        obj.buf[:regions.NONCE_BYTES] = nonce
        self.objects.append(obj)
        return obj, nonce

    def register(self, size=4096, **kw):
        obj, nonce = self.shm(size)
        request = dict(session=self.session, name=obj.name, size=size, nonce=nonce, **kw)
        return obj, self.stub.RegisterRegion(pb.RegisterRegionRequest(**request)).region

    def quantize(self, inputs, outputs, session=None, shape=(4, 64)):
        header = pb.QuantizeHeader(tensor=wire.tensor_info("x", torch.bfloat16, shape), spec=pb.QuantSpec(format="fp8_e4m3"),
                                   regions=pb.RegionTensors(session=session or self.session, inputs=inputs, outputs=outputs))
        return list(self.stub.Quantize(iter([pb.QuantizeRequest(header=header)])))

    def close(self):
        self.call.cancel()
        for obj in self.objects:
            obj.close()
            obj.unlink()
        self.channel.close()


def code_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def ref(region, offset, size):
    return pb.RegionRef(region=region, offset=offset, size=size)


def test_registration_needs_a_session_a_plain_name_and_the_nonce(server):
    raw = RawSession(server.target)
    try:
        obj, nonce = raw.shm(4096)
        register = lambda **kw: raw.stub.RegisterRegion(pb.RegisterRegionRequest(  # noqa: E731
            **{"session": raw.session, "name": obj.name, "size": 4096, "nonce": nonce, **kw}))
        assert code_of(lambda: register(nonce=secrets.token_bytes(32))) == (
            DENIED, f"region {obj.name!r} does not hold the request's nonce: the client must write it into the region, "
                    "on the server's host, before registering")
        assert code_of(lambda: register(session="0" * 32))[0] == NOT_FOUND
        assert code_of(lambda: register(name="../../etc/passwd"))[0] == INVALID
        assert code_of(lambda: register(name="quantd-no-such-object"))[0] == NOT_FOUND
        assert "bytes, smaller than the 8192 registered" in code_of(lambda: register(size=8192))[1]
        assert code_of(lambda: register(nonce=b"short"))[0] == INVALID
        assert register().region
        assert server_regions(server) == 1
    finally:
        raw.close()
    wait_for(lambda: server_regions(server) == 0)


def test_requests_are_checked_against_their_regions(server):
    raw, other = RawSession(server.target), RawSession(server.target)
    try:
        _, region = raw.register(4096)
        _, foreign = other.register(4096)
        outputs = [ref(region, 1024, 256), ref(region, 2048, 4)]  # codes (4 x 64 fp8), one fp32 scale per row: 4 x 1
        outputs[1].size = 16
        assert len(raw.quantize([ref(region, 512, 512)], outputs)) == 2  # header and summary: valid
        cases = {
            "out of bounds": ([ref(region, 3840, 512)], outputs, INVALID, "out of bounds of the 4096-byte region"),
            "negative offset": ([ref(region, -64, 512)], outputs, INVALID, "out of bounds"),
            "wrong size": ([ref(region, 512, 500)], outputs, INVALID, "is 512 bytes, the reference gives 500"),
            "odd offset": ([ref(region, 513, 512)], outputs, INVALID, "not a multiple of its element size 2"),
            "output on input": ([ref(region, 512, 512)], [ref(region, 768, 256), outputs[1]], INVALID,
                                "output 0 overlaps input 0"),
            "outputs overlap": ([ref(region, 512, 512)], [outputs[0], ref(region, 1024, 16)], INVALID,
                                "output 1 overlaps output 0"),
            "missing output": ([ref(region, 512, 512)], outputs[:1], INVALID, "1 input(s) and 2 output(s) expected"),
            "unknown region": ([ref("feedbeef", 0, 512)], outputs, NOT_FOUND, "unknown region 'feedbeef'"),
            "another session's region": ([ref(foreign, 512, 512)], outputs, DENIED, "belongs to another session"),
        }
        for name, (inputs, outs, code, message) in cases.items():
            got = code_of(lambda: raw.quantize(inputs, outs))
            assert got[0] == code and message in got[1], (name, got)
        assert code_of(lambda: raw.quantize([ref(region, 512, 512)], outputs, session="1" * 32))[0] == NOT_FOUND
        assert code_of(lambda: raw.stub.UnregisterRegion(pb.UnregisterRegionRequest(session=raw.session, region=foreign)))[0] == DENIED
        raw.stub.UnregisterRegion(pb.UnregisterRegionRequest(session=raw.session, region=region))
        assert code_of(lambda: raw.stub.UnregisterRegion(pb.UnregisterRegionRequest(session=raw.session, region=region)))[0] == NOT_FOUND
        status = raw.stub.RegionStatus(pb.RegionStatusRequest(session=raw.session))
        assert list(status.regions) == [] and status.server_regions == 1  # the other session's
    finally:
        raw.close()
        other.close()
    wait_for(lambda: server_regions(server) == 0)
    x = torch.randn(4, 64).bfloat16()
    assert_same(QuantdClient(server.target).quantize(x), quantize(x, QuantSpec()))  # still serving


def test_a_vanished_or_shrunk_region_is_not_found(server):
    raw = RawSession(server.target)
    try:
        outputs = [ref(None, 1024, 256), ref(None, 2048, 16)]
        for damage in ("unlink", "shrink"):
            obj, region = raw.register(4096)
            for r in outputs:
                r.region = region
            if damage == "unlink":
                obj.unlink()
                raw.objects.remove(obj)
            else:
                os.truncate(f"{regions.SHM_DIR}/{obj.name}", 1024)
            code, details = code_of(lambda: raw.quantize([ref(region, 512, 512)], outputs))
            assert code == NOT_FOUND and ("vanished" if damage == "unlink" else "shrank below 4096 bytes") in details
    finally:
        raw.close()
    wait_for(lambda: server_regions(server) == 0)


def memory_file(size: int, nonce: bytes, seals: int) -> int:
    fd = os.memfd_create("quantd-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, nonce, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_server_takes_only_memory_its_client_cannot_shrink(sealed_server):
    """Shrinking a mapped file under a copy faults the server: by default it maps only memory files sealed with
    F_SEAL_SHRINK, which quantd's client makes; a named object, an unsealed memory file, a file on disk are refused."""
    raw = RawSession(sealed_server.target)
    nonce = secrets.token_bytes(regions.NONCE_BYTES)
    fds = []

    def register(fd, pid=os.getpid()):
        return raw.stub.RegisterRegion(pb.RegisterRegionRequest(session=raw.session, size=4096, nonce=nonce,
                                                                memfd=pb.MemoryFile(pid=pid, fd=fd))).region
    try:
        obj, _ = raw.shm(4096, nonce)
        code, details = code_of(lambda: raw.stub.RegisterRegion(pb.RegisterRegionRequest(
            session=raw.session, name=obj.name, size=4096, nonce=nonce)))
        assert code == PRECONDITION and "is not sealed against shrinking" in details and "--shm-unsealed allow" in details
        fds.append(memory_file(4096, nonce, seals=0))
        assert code_of(lambda: register(fds[-1]))[0] == PRECONDITION
        with tempfile.TemporaryFile() as f:  # a file on disk takes no seals
            f.write(nonce + bytes(4096 - len(nonce)))
            f.flush()
            assert code_of(lambda: register(f.fileno()))[0] == PRECONDITION
        r, w = os.pipe()
        fds += [r, w]
        assert code_of(lambda: register(r)) == (INVALID, f"'memfd:{os.getpid()}/{r}' is not a memory file")
        fds.append(memory_file(4096, nonce, seals=fcntl.F_SEAL_SHRINK))
        sealed = fds[-1]
        assert code_of(lambda: register(sealed, pid=1 << 23))[0] == NOT_FOUND  # above any pid_max: no such process
        region = register(sealed)
        with pytest.raises(PermissionError):
            os.ftruncate(sealed, 1024)  # the seal holds: the client cannot take the server's pages away
        outputs = [ref(region, 1024, 256), ref(region, 2048, 16)]
        assert len(raw.quantize([ref(region, 512, 512)], outputs)) == 2
        os.close(fds.pop())  # the client's descriptor closes; the server's stays, and so does the memory
        assert len(raw.quantize([ref(region, 512, 512)], outputs)) == 2
        (info,) = raw.stub.RegionStatus(pb.RegionStatusRequest(session=raw.session)).regions
        assert info.name == f"memfd:{os.getpid()}/{sealed}"
    finally:
        for fd in fds:
            os.close(fd)
        raw.close()
    wait_for(lambda: server_regions(sealed_server) == 0)
    x = torch.randn(64, 128).bfloat16()
    with QuantdClient(sealed_server.target, transport="shm") as client:  # quantd's client registers sealed files
        assert_same(client.quantize(x), quantize(x, QuantSpec()))
        # the scratch region and the result region
        assert [r["name"].startswith("memfd:") for r in client.region_status()["regions"]] == [True, True]


def test_quantd_serve_refuses_a_region_its_client_could_shrink():
    """A real `quantd serve`: a named /dev/shm object (which its client could shrink mid-copy, faulting the server,
    benchmarks/hostile.py --only shrink) is refused; quantd's client's sealed region cannot be shrunk; still serving."""
    server = ServerProcess()
    try:
        raw = RawSession(server.target)
        try:
            code, details = code_of(lambda: raw.register(4096))
            assert code == PRECONDITION and "not sealed against shrinking" in details
        finally:
            raw.close()
        with QuantdClient(server.target, transport="shm") as client:
            x = client.shm_tensor((64, 128), torch.bfloat16)
            x.normal_()
            assert_same(client.quantize(x), quantize(x, QuantSpec()))
            with pytest.raises(PermissionError):
                os.ftruncate(client._shm.user_regions[0].memory.fd, 0)
            assert_same(client.quantize(x), quantize(x, QuantSpec()))
    finally:
        server.close()


def test_regions_are_released_when_the_session_ends(server):
    client = QuantdClient(server.target, transport="shm")
    client.quantize(torch.randn(8, 128).bfloat16())
    client.shm_tensor((256, 256))
    assert server_regions(server) == 3  # scratch, the result region, the tensor's
    session = client._shm.session
    client.close()
    assert server_regions(server) == 0  # CloseSession answers once they are released, not some time after
    stub = quantd_pb2_grpc.QuantdStub(grpc.insecure_channel(server.target))
    for call in (lambda: stub.CloseSession(pb.CloseSessionRequest(session=session)),
                 lambda: stub.RegisterRegion(pb.RegisterRegionRequest(session=session, size=4096,
                                                                      nonce=bytes(regions.NONCE_BYTES)))):
        assert code_of(call)[0] == NOT_FOUND  # the session is gone
    raw = RawSession(server.target)
    raw.register()
    raw.call.cancel()  # a cancelled OpenSession call ends the session as well
    wait_for(lambda: server_regions(server) == 0)
    raw.close()


def test_region_rpcs_need_the_token():
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", auth_tokens=("s3cret",))
    with BackgroundServer(config) as running:
        stub = quantd_pb2_grpc.QuantdStub(grpc.insecure_channel(running.target))
        for call in (lambda: next(stub.OpenSession(pb.OpenSessionRequest())),
                     lambda: stub.RegisterRegion(pb.RegisterRegionRequest()),
                     lambda: stub.UnregisterRegion(pb.UnregisterRegionRequest()),
                     lambda: stub.RegionStatus(pb.RegionStatusRequest()),
                     lambda: stub.CloseSession(pb.CloseSessionRequest())):
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
        with QuantdClient(running.target, token="s3cret", transport="shm") as client:
            x = torch.randn(4, 128).bfloat16()
            assert_same(client.quantize(x), quantize(x, QuantSpec()))
            assert client.last_transport.transport == "shm"


# ---- shared memory: a client killed while holding regions, a server on "another host" ---------------------------

def rss_shmem_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem line")


def mapped_regions(pid: int) -> int:
    return sum("/dev/shm/quantd-" in line or "/memfd:quantd-" in line
               for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


HOLDER = textwrap.dedent("""
    import sys, time, torch
    from quantd.client import QuantdClient
    from quantd.kernels import QuantSpec
    client = QuantdClient(sys.argv[1], transport="shm")
    x = client.shm_tensor((4096, 4096), torch.bfloat16)   # 32 MiB, mapped and touched by the server below
    x.normal_()
    client.quantize(x, QuantSpec(), report=True)
    print("holding", flush=True)
    time.sleep(600)
""")


def test_a_killed_client_leaves_nothing_mapped():
    server = ServerProcess()
    try:
        baseline = rss_shmem_kib(server.proc.pid)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.target], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "holding"
            assert mapped_regions(server.proc.pid) == 3  # the scratch region, the result region, the 32 MiB tensor's
            assert rss_shmem_kib(server.proc.pid) >= baseline + 32 * 1024
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
        wait_for(lambda: mapped_regions(server.proc.pid) == 0)
        wait_for(lambda: rss_shmem_kib(server.proc.pid) <= baseline + 1024)  # the kernel updates RSS counters lazily
        with QuantdClient(server.target, transport="shm") as client:
            x = torch.randn(64, 128).bfloat16()
            assert_same(client.quantize(x), quantize(x, QuantSpec()))
            assert client.region_status()["server_regions"] == 2  # only this client's scratch and result regions
    finally:
        server.close()


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "-p", "-f", "--mount-proc", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
        capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unshare and mount (root) to give a server its own /dev/shm")
def test_auto_falls_back_with_the_reason_when_the_server_has_another_shm():
    """A server with a /dev/shm and processes of its own (mount and pid namespaces) stands for a server on another
    host: it finds neither the client's memory file nor its named object."""
    port = free_port()
    serve = " ".join(quantd_command() + ["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                         "--shm-unsealed", "allow", "--cpu-compile", "off"])
    proc = subprocess.Popen(["unshare", "-m", "-p", "-f", "--mount-proc", "sh", "-c",
                             f"mount -t tmpfs tmpfs /dev/shm && exec {serve}"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = f"127.0.0.1:{port}"
        grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=120)
        x, spec = torch.randn(64, 128).bfloat16(), QuantSpec("fp8_e4m3", group_size=32)
        with QuantdClient(target, transport="auto", parallel_streams=2) as client:
            assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
            assert client.last_transport.transport == "streams"
            assert_same(client.quantize(x, spec), quantize(x, spec))
            choice = client.last_transport
            assert choice.transport == "grpc"
            assert choice.reason.startswith("ipc: the tensors are not all on a GPU; shm: the server cannot use this "
                                            "host's shared memory (NOT_FOUND: no shared memory 'quantd-")
            assert "; streams: report and dequantized need the whole tensor in one call" in choice.reason
            with pytest.raises(QuantdError) as info:
                client.shm_tensor((4, 4))
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # unshare ignores it and waits for the server, which drains and exits
        proc.wait(60)


# ---- parallel streams --------------------------------------------------------------------

@pytest.fixture(scope="module")
def streams_client(server):
    """Three streams from three worker processes, started once (spawning one takes seconds)."""
    with QuantdClient(server.target, transport="streams", parallel_streams=3) as client:
        yield client


@pytest.mark.parametrize("shape", [(40, 96), (41, 100)], ids=str)  # (41, 100): uneven pieces, ragged blocks
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_parallel_streams_match_one_stream(server, streams_client, spec, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = streams_client.quantize(x, spec, report=False, amax=True)
    with QuantdClient(server.target) as one:
        want = one.quantize(x, spec, report=False, amax=True)
    assert_same(got, want)
    assert_same(got, quantize(x, spec))
    assert got.amax == want.amax == x.float().abs().max()
    if spec.granularity.value == "tensor" or spec.format.value == "nvfp4":  # nvfp4: the tensor scale
        assert got.transport == Choice("grpc", f"streams: {spec.describe()} needs the whole tensor for its scales")
    else:
        assert got.transport.transport == "streams"


def worker_pids(client) -> list:
    return [process.pid for process, _ in client._workers.workers]


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def memory_files() -> tuple:
    """(descriptors, mappings) of quantd memory files in this process."""
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sum("memfd:quantd-" in f for f in fds), sum("memfd:quantd-" in m for m in maps)


def test_streams_results_held_keep_their_memory_and_released_memory_serves_again(server, streams_client):
    spec = QuantSpec("fp8_e4m3", group_size=64)
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    first = streams_client.quantize(x, spec, report=False)
    second = streams_client.quantize(y, spec, report=False)  # the first results still live: other memory
    assert first.codes.data_ptr() != second.codes.data_ptr()
    assert_same(first, quantize(x, spec))
    assert_same(second, quantize(y, spec))
    del first, second
    targets = list(streams_client._workers.targets)
    again = streams_client.quantize(x, spec, report=False)  # a kept memory, free again
    assert streams_client._workers.targets == targets and len(targets) <= streams_client._workers.MAX_TARGETS
    assert_same(again, quantize(x, spec))
    del again


def test_streams_workers_and_their_memory_go_with_close(server):
    """An input already in a shm_tensor region is read there; results outlive close(), their mapping with them."""
    spec, before = QuantSpec("fp8_e4m3", group_size=64), memory_files()
    client = QuantdClient(server.target, transport="streams", parallel_streams=2)
    x = client.shm_tensor((64, 128))
    x.copy_(torch.randn(64, 128))
    in_place = client.quantize(x, spec, report=False)
    assert client._workers.staging is None
    copied = client.quantize(x.clone(), spec, report=False)
    assert client._workers.staging is not None
    pids = worker_pids(client)
    assert len(pids) == 2 and not any(gone(pid) for pid in pids)
    client.close()
    assert all(gone(pid) for pid in pids) and not client._workers.workers
    assert_same(in_place, quantize(x.clone(), spec))
    assert_same(copied, quantize(x.clone(), spec))
    del x, in_place, copied
    wait_for(lambda: memory_files() == before)  # the server lets go of the session's regions as it sees it end


def test_a_worker_killed_in_a_call_fails_it_and_the_client_goes_on():
    server = ServerProcess()
    try:
        x, spec = torch.randn(64, 128).bfloat16(), QuantSpec("fp8_e4m3", group_size=64)
        with QuantdClient(server.target, transport="streams", parallel_streams=2) as client:
            assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
            first = worker_pids(client)
            server.proc.send_signal(signal.SIGSTOP)  # the workers' calls wait on it
            try:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    call = pool.submit(client.quantize, x, spec, report=False)
                    time.sleep(1)
                    os.kill(first[1], signal.SIGKILL)
                    with pytest.raises(QuantdError) as info:
                        call.result(60)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert info.value.details == (f"streams worker process {first[1]} died (exit code -9) in the call; "
                                          "the next call starts new ones")
            assert all(gone(pid) for pid in first)
            assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
            dead = client._workers.workers[0][0]
            os.kill(dead.pid, signal.SIGKILL)  # between calls: replaced before the next
            dead.join(30)
            assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
            assert set(worker_pids(client)).isdisjoint(first + [dead.pid])
    finally:
        server.close()


def test_streams_workers_end_with_their_client_process(server):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from quantd.client import QuantdClient
        from quantd.kernels import QuantSpec
        client = QuantdClient({server.target!r}, transport="streams", parallel_streams=2)
        client.quantize(torch.randn(8, 64), QuantSpec(), report=False)
        print(*[process.pid for process, _ in client._workers.workers], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    pids = [int(pid) for pid in run.stdout.split()]
    assert len(pids) == 2
    wait_for(lambda: all(gone(pid) for pid in pids))


def test_workers_share_one_port_and_each_serves_streams():
    server = ServerProcess("--workers", "2", metrics=True)
    try:
        x, spec = torch.randn(256, 128).bfloat16(), QuantSpec("fp8_e4m3", group_size=64)
        with QuantdClient(server.target, transport="streams", parallel_streams=2) as client:
            # the kernel picks a worker for each connection: the stream workers reconnect until they have both
            assert_same(client.quantize(x, spec, report=False), quantize(x, spec))
        served = []
        for port in (server.metrics_port, server.metrics_port + 1):
            server.metrics_port = port
            served.append(server.scrape().get(("quantd_requests_total", frozenset(
                {"code": "OK", "rpc": "Quantize", "service": "quantd.v1.Quantd"}.items())), 0))
        server.metrics_port -= 1
        assert served == [1, 1]
        infos = set()
        for _ in range(40):  # and each process names itself
            with QuantdClient(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                infos.add(client.server_info()["instance"])
            if len(infos) == 2:
                break
        assert len(infos) == 2 and all(len(i) == 16 for i in infos)
        server.terminate()
        assert server.proc.wait(60) == 0
    finally:
        server.close()


# ---- CUDA IPC (on a GPU machine: pytest -m gpu tests/test_transports.py) ---------------------------------------

@pytest.mark.gpu
def test_cuda_ipc_results_are_the_kernels_bytes():
    from quantd.kernels import dispatch
    server = ServerProcess("--device", "cuda")
    try:
        x = torch.randn(1024, 4096, device="cuda").bfloat16()
        spec = QuantSpec("fp8_e4m3", group_size=128)
        want = dispatch.quantize(x, spec)
        with QuantdClient(server.target, transport="auto") as client:
            got = client.quantize(x, spec, dequantized=True)
            assert got.transport == Choice("ipc", "the server sees the tensors' GPU", via="local socket")
            assert got.codes.is_cuda and got.codes.device == x.device
            assert_same(got, want)
            assert torch.equal(got.dequantized, dispatch.dequantize(want))
            assert torch.equal(client.dequantize(got), dispatch.dequantize(want))
            assert client.last_transport.transport == "ipc"
            a = torch.randn(256, 4096, device="cuda").bfloat16()
            a_spec = QuantSpec("fp8_e4m3", group_size=128)
            assert torch.equal(client.matmul(a, got, a_spec=a_spec),
                               dispatch.matmul(dispatch.quantize(a, a_spec), want, torch.bfloat16))
            assert client.last_transport.transport == "ipc"
            for _ in range(3):  # the same storages again: torch's cache of opened handles
                assert_same(client.quantize(x, spec, report=False), want)
            y = x[:, :2048]  # not contiguous: sent as a contiguous copy
            assert_same(client.quantize(y, spec, report=False), dispatch.quantize(y.contiguous(), spec))
    finally:
        server.close()


def test_kept_storages_are_bounded_least_recently_used_first_and_released_by_name():
    from quantd.server.cuda_ipc import Kept
    from quantd.server.errors import ServiceError
    kept, views = Kept(), {}
    described = lambda i: pb.CudaIpcTensor(handle=b"h%d" % (i % 3), storage_offset_bytes=4096 * i)  # noqa: E731
    for i in range(regions.KEPT_STORAGES + 2):
        views[i] = torch.empty(64, dtype=torch.uint8)
        kept.keep(described(i), views[i])
        kept.keep(described(0), views[0])  # used again: the most recent
    assert len(kept.storages) == regions.KEPT_STORAGES
    with pytest.raises(ServiceError) as info:
        kept.get(described(1))  # the least recently used went first
    assert info.value.code == PRECONDITION and regions.NOT_KEPT in info.value.message
    assert kept.get(described(0)).data_ptr() == views[0].data_ptr()
    kept.release([pb.CudaIpcTensor(handle=b"h0", storage_offset_bytes=0), described(5)])
    assert len(kept.storages) == regions.KEPT_STORAGES - 2
    with pytest.raises(ServiceError):
        kept.get(described(0))
    # a request is checked whole before anything is opened: `kept` names a storage kept now, or one shared with
    # `keep` by an earlier tensor of the same request (a result buffer's codes, then its scales)
    named = lambda t: pb.CudaIpcTensor(handle=t.handle, storage_offset_bytes=t.storage_offset_bytes,  # noqa: E731
                                       kept=True)
    fresh = pb.CudaIpcTensor(handle=b"new", keep=True)
    kept.check([named(described(9)), fresh, named(fresh)])
    for request in ([named(fresh), fresh], [named(described(0))], [fresh, named(described(1))]):
        with pytest.raises(ServiceError) as info:
            kept.check(request)
        assert info.value.code == PRECONDITION


def test_replay_plans_go_with_any_change_to_the_kept_storages():
    from quantd.server import replay
    from quantd.server.cuda_ipc import Kept
    kept, views = Kept(), [torch.empty(64, dtype=torch.uint8) for _ in range(regions.KEPT_STORAGES + 1)]
    described = [pb.CudaIpcTensor(handle=b"h%d" % i, storage_offset_bytes=0) for i in range(len(views))]
    launches = []

    def planned():
        for d, v in zip(described[:2], views):
            kept.keep(d, v)
        offer = replay.Offer("Quantize", None, 0, lambda: launches.append(1))
        kept.plans.add(b"request", replay.Plan(offer, b"answer", ((b"h0", 0), (b"h1", 0))))
        return kept.plans.get(b"request")
    plan = planned()
    plan.run()  # no CUDA graph here (capture fails on the CPU): launched plainly, every time
    plan.run()
    assert launches == [1, 1] and plan.graph is None and plan.captured
    kept.release([pb.CudaIpcTensor(handle=b"nothing kept")])  # releases nothing: the plan stays
    assert kept.plans.get(b"request") is plan
    kept.release([described[1]])
    assert kept.plans.get(b"request") is None
    planned()
    for d, v in zip(described[2:], views[2:]):  # one storage past the bound lets the least recently used go
        kept.keep(d, v)
    assert kept.plans.get(b"request") is None
    planned()
    kept.touch([(b"h0", 0)])
    assert next(reversed(kept.storages)) == (b"h0", 0)
    kept.clear()
    assert kept.plans.get(b"request") is None
    for i in range(replay.PLANS + 1):  # bounded, the least recently used dropped first
        kept.plans.add(b"%d" % i, plan)
    assert kept.plans.get(b"0") is None and kept.plans.get(b"1") is plan


@pytest.mark.gpu
def test_repeated_cuda_ipc_calls_are_replayed_from_a_cuda_graph_and_stay_exact():
    """The same call again (same kept input, same result buffer) is served from its plan, its kernels from a CUDA
    graph: each replay reads the input's bytes of now, and anything that changes the call is served in full."""
    from quantd.kernels import dispatch
    server = ServerProcess("--device", "cuda", metrics=True)

    def replayed(rpc, graph="true"):
        return server.scrape().get(("quantd_replayed_calls_total", frozenset({("rpc", rpc), ("graph", graph)})), 0)
    try:
        x = torch.randn(512, 4096, device="cuda").bfloat16()
        with QuantdClient(server.target, transport="ipc") as client:
            for spec in (QuantSpec("fp8_e4m3", group_size=128), QuantSpec("fp8_e4m3", granularity="tensor"),
                         QuantSpec("int8_asym", group_size=32), QuantSpec("mxfp4")):
                before = replayed("Quantize")
                for step in range(5):
                    x.copy_(torch.randn_like(x) * (step + 1))
                    x[0, :7] = torch.tensor([0, -0.0, 448, -448, float("inf"), float("nan"), 1e-40])
                    got = client.quantize(x, spec, report=False)
                    assert_same(got, dispatch.quantize(x, spec))
                    del got  # its buffer serves the next call: the same request again
                assert replayed("Quantize") - before >= 2, spec
                held = client.quantize(x, spec, report=False)  # the last results held: another buffer
                assert_same(held, dispatch.quantize(x, spec))
                assert_same(client.quantize(x, spec, report=True), dispatch.quantize(x, spec))
                want = dispatch.dequantize(dispatch.quantize(x, spec))
                for _ in range(4):
                    assert same_bits(client.dequantize(held), want)
                del held
            assert replayed("Dequantize") >= 2
            spec = QuantSpec("fp8_e4m3", group_size=128)
            a, b = client.quantize(x[:256], spec, report=False), client.quantize(x, spec, report=False)
            want = dispatch.matmul(dispatch.quantize(x[:256], spec), dispatch.quantize(x, spec), torch.bfloat16)
            for _ in range(4):
                assert same_bits(client.matmul(a, b), want)
            assert replayed("Matmul") >= 2
            y = torch.randn(256, 4096, device="cuda").bfloat16()
            assert_same(client.quantize(y, spec, report=False), dispatch.quantize(y, spec))
            count = replayed("Quantize")
            del y  # the next call releases y's storage: the session's plans go, the call is served in full
            assert_same(client.quantize(x, spec, report=False), dispatch.quantize(x, spec))
            assert replayed("Quantize") == count
    finally:
        server.close()


@pytest.mark.gpu
def test_cuda_ipc_storages_stay_open_and_freed_inputs_are_let_go(monkeypatch):
    from quantd.client import transports
    from quantd.kernels import dispatch
    shared_now = []
    share = transports.ipc_tensor
    # counts what is shared; holding the tensors would keep result buffers in use
    monkeypatch.setattr(transports, "ipc_tensor", lambda t: shared_now.append(t.dtype) or share(t))
    server = ServerProcess("--device", "cuda")
    try:
        spec = QuantSpec("fp8_e4m3", group_size=128)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        x, y = torch.randn(1024, 4096, device="cuda").bfloat16(), torch.randn(512, 4096, device="cuda").bfloat16()
        with QuantdClient(server.target, transport="ipc") as client:
            first = client.quantize(x, spec, report=False)
            assert len(shared_now) == 2  # x, then the result buffer (the codes; the scales name it kept)
            assert client.region_status()["kept_storages"] == 2
            second = client.quantize(x, spec, report=False)  # x kept; the first results hold their buffer
            assert len(shared_now) == 3 and client.region_status()["kept_storages"] == 3
            assert first.codes.untyped_storage().data_ptr() != second.codes.untyped_storage().data_ptr()
            buffer = first.codes.untyped_storage().data_ptr()
            del first
            third = client.quantize(x, spec, report=False)  # the first buffer again, nothing shared
            assert len(shared_now) == 3 and third.codes.untyped_storage().data_ptr() == buffer
            want = dispatch.quantize(x, spec)
            assert_same(second, want)
            assert_same(third, want)
            assert_same(client.quantize(y, spec, report=False), dispatch.quantize(y, spec))
            kept_y = client.region_status()["kept_storages"]
            y_bytes = y.numel() * y.element_size()
            del y
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()  # y's block waits for the server to let go
            # this call tells it to; its results fit the buffer of y's, so no buffer is added
            assert_same(client.quantize(x[:512], spec, report=False), dispatch.quantize(x[:512], spec))
            assert client.region_status()["kept_storages"] == kept_y - 1
            torch.cuda.ipc_collect()
            assert torch.cuda.memory_allocated() <= held - y_bytes
            # the server let go of x behind the client's back: the call is shared again and retried
            x_key = x.untyped_storage()._cdata
            client._ipc.release.append(transports._named(client._ipc.kept[x_key].description))
            before = len(shared_now)
            assert_same(client.quantize(x, spec, report=False), want)
            assert len(shared_now) > before
            # more distinct inputs than the server keeps: it keeps its bound, every result is right
            many = [torch.randn(64, 4096, device="cuda").bfloat16() for _ in range(regions.KEPT_STORAGES + 3)]
            for t in many:
                assert_same(client.quantize(t, spec, report=False), dispatch.quantize(t, spec))
            assert client.region_status()["kept_storages"] == regions.KEPT_STORAGES
            assert len(client._ipc.kept) == regions.KEPT_STORAGES
            del second, third, many, want, t
        del x

        def returned():
            torch.cuda.ipc_collect()
            return torch.cuda.memory_allocated() <= baseline + (1 << 20)

        def held():
            live = [(tuple(o.shape), o.untyped_storage().nbytes()) for o in gc.get_objects()
                    if isinstance(o, torch.Tensor) and o.is_cuda]
            return f"({(torch.cuda.memory_allocated() - baseline) / 2**20:.2f} MiB over the baseline; live: {live})"
        wait_for(returned, why=held)  # the session ended: the server let go of everything, and torch freed it
    finally:
        server.close()


@pytest.mark.gpu
def test_a_refused_cuda_ipc_call_leaves_no_client_memory_held():
    """Each share of a storage counts the server as its user until the server's copy goes: a request the server
    refuses, before (admission) or while (a `kept` storage it no longer holds) opening its tensors, must release
    the counters of the shares it did not open, or the client's memory stays reserved for the life of its process."""
    server = ServerProcess("--device", "cuda", "--max-tensor-bytes", str(4 << 20))
    try:
        spec = QuantSpec("fp8_e4m3", group_size=128)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        big, small = torch.randn(1024, 4096, device="cuda").bfloat16(), torch.randn(64, 4096, device="cuda").bfloat16()
        with QuantdClient(server.target, transport="ipc", retries=0) as client:
            with pytest.raises(QuantdError) as refused:
                client.quantize(big, spec, report=False)  # 8 MiB: over the server's max_tensor_bytes
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            del refused  # its traceback holds the client's frames, and they `big`
            assert_same(client.quantize(small, spec, report=False), quantize(small, spec))
            assert client.last_transport.transport == "ipc"
        del big, small
        def released():
            gc.collect()
            torch.cuda.ipc_collect()
            return torch.cuda.memory_allocated() <= baseline
        wait_for(released, why=lambda: f"({torch.cuda.memory_allocated() - baseline} bytes over the baseline)")
    finally:
        server.close()


@pytest.mark.gpu
def test_a_closed_cuda_ipc_client_exits_with_nothing_shared_left():
    """close() ends the session before it returns, the server letting go of the storages it kept open: a process
    that then frees its tensors and exits has no share left. (torch warns at exit about a storage another process
    still held when it was freed, and about any shared storage still alive at exit, whoever held it: the script
    frees its tensors first.)"""
    server = ServerProcess("--device", "cuda")
    try:
        script = (
            "import gc, torch\n"
            "from quantd.client import QuantdClient\n"
            "from quantd.kernels import QuantSpec\n"
            f"client = QuantdClient({server.target!r}, transport='ipc')\n"
            "x = torch.randn(256, 4096, device='cuda').bfloat16()\n"
            "for _ in range(3):\n"
            "    q = client.quantize(x, QuantSpec('fp8_e4m3', group_size=128), report=False)\n"
            "assert client.last_transport.transport == 'ipc' and client.region_status()['kept_storages'] > 0\n"
            "client.close()\n"
            "del q, x\n"
            "gc.collect()\n"
            "print('closed')\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "closed" in done.stdout, done.stderr
        assert "Producer process has been terminated" not in done.stderr, done.stderr
    finally:
        server.close()


@pytest.mark.gpu
def test_cuda_ipc_kept_references_are_checked():
    from quantd.client import transports
    server = ServerProcess("--device", "cuda")
    try:
        x = torch.randn(64, 256, device="cuda").bfloat16()
        with QuantdClient(server.target, transport="ipc") as client:
            client.quantize(x, report=False)
            d = client._ipc.kept[x.untyped_storage()._cdata].description
            out = transports.ipc_tensor(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
            outputs = [out, pb.CudaIpcTensor(**{**{f.name: v for f, v in out.ListFields()}, "offset_bytes": 1 << 19})]

            def send(t, session=None):
                header = pb.QuantizeHeader(tensor=wire.tensor_info("x", torch.bfloat16, (64, 256)),
                                           spec=pb.QuantSpec(format="fp8_e4m3"),
                                           cuda=pb.CudaTensors(session=session or client._shm.session, inputs=[t],
                                                               outputs=outputs,
                                                               device_uuid=transports.device_uuid(x.device)))
                return list(client.streams["Quantize"](iter([pb.QuantizeRequest(header=header)])))
            named = dict(handle=d.handle, storage_offset_bytes=d.storage_offset_bytes, kept=True)
            assert code_of(lambda: send(pb.CudaIpcTensor(**named, storage_bytes=d.storage_bytes * 2)))[0] == INVALID
            code, details = code_of(lambda: send(pb.CudaIpcTensor(**{**named, "storage_offset_bytes": 1 << 30},
                                                                  storage_bytes=d.storage_bytes)))
            assert code == PRECONDITION and regions.NOT_KEPT in details
            with QuantdClient(server.target, transport="ipc") as other:  # another session keeps nothing of x's
                other.quantize(torch.randn(64, 256, device="cuda").bfloat16(), report=False)
                code, details = code_of(lambda: send(pb.CudaIpcTensor(**named, storage_bytes=d.storage_bytes),
                                                     session=other._shm.session))
                assert code == PRECONDITION and regions.NOT_KEPT in details
            assert_same(client.quantize(x, report=False), quantize(x.cpu(), QuantSpec()))
    finally:
        server.close()


@pytest.mark.gpu
def test_cuda_ipc_falls_back_when_the_server_is_on_the_cpu(server):
    x = torch.randn(64, 256, device="cuda").bfloat16()
    with QuantdClient(server.target, transport="ipc") as client:
        got = client.quantize(x)
        assert got.transport.transport == "grpc"
        assert got.transport.reason.startswith("ipc: the server computes on the CPU, the tensors are on GPU-")
        assert_same(got, quantize(x.cpu(), QuantSpec()))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_shm_quantize_on_a_gpu_runs_in_overlapped_pieces_with_the_whole_tensors_bytes(spec, rng):
    from test_delayed_scaling import random_scales

    from quantd.kernels import dispatch, reference
    from quantd.protocol.pieces import plan_pieces
    piece_bytes = 64 * 1024
    server = ServerProcess("--device", "cuda", "--piece-bytes", str(piece_bytes))
    try:
        x = torch.randn(1000, 352, generator=rng)  # ragged: the last piece is short
        x[3, :40] = 0
        x[7, 5] = 3e38
        pieces = len(plan_pieces(spec, x.shape, piece_bytes, 4))
        assert pieces > 1 or spec.granularity.value == "tensor" or spec.format.value == "nvfp4"
        with QuantdClient(server.target, transport="shm") as client:
            shared_x = client.shm_tensor(x.shape, x.dtype)
            shared_x.copy_(x)
            for source in (x, shared_x):
                got = client.quantize(source, spec, report=False, amax=True)
                assert got.transport.transport == "shm"
                assert_same(got, dispatch.quantize(x.cuda(), spec))
                assert got.amax == float(reference.amax(x))
            if spec.format.value != "int8_asym":  # which derives its scales
                scales = random_scales(spec, x.shape, rng)
                assert_same(client.quantize(shared_x, spec, report=False, scales=scales),
                            dispatch.quantize(x.cuda(), spec, scales=scales.cuda()))
    finally:
        server.close()


@pytest.mark.gpu
def test_shm_regions_are_pinned_for_a_gpu_server():
    from quantd.kernels import dispatch
    server = ServerProcess("--device", "cuda")
    try:
        x, spec = torch.randn(2048, 4096).bfloat16(), QuantSpec("mxfp8")
        with QuantdClient(server.target, transport="auto") as client:
            got = client.quantize(x, spec, dequantized=True)
            assert got.transport == Choice("shm", "the server shares this host", via="local socket")
            want = dispatch.quantize(x.cuda(), spec)
            assert_same(got, want)
            assert torch.equal(got.dequantized, dispatch.dequantize(want).cpu())
            assert all(r["pinned"] for r in client.region_status()["regions"])
    finally:
        server.close()
