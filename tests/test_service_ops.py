"""Health, reflection, graceful drain (in process and on SIGTERM) and retries across replicas."""
import base64
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from quantd.client import QuantdClient, QuantdError
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def config(**kw):
    return ServerConfig(host="127.0.0.1", port=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(config()) as running:
        yield running


def health_status(target, service=""):
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health(server):
    assert health_status(server.target) == SERVING
    assert health_status(server.target, "quantd.v1.Quantd") == SERVING


def test_reflection_driven_client_discovers_and_calls_every_rpc(server):
    """Build every request from descriptors fetched over reflection alone, call each RPC, and decode the answers."""
    x = torch.randn(4, 64)
    want = reference.quantize(x, QuantSpec("int8_sym", "channel", axis=0))
    tensor = {"name": "x", "dtype": "float32", "shape": [4, 64]}
    spec = {"format": "int8_sym", "granularity": "channel", "axis": 0}
    chunk = {"chunk": {"offset": 0, "data": base64.b64encode(x.numpy().tobytes()).decode()}}
    codes = {"name": "codes", "dtype": "int8", "shape": [4, 64]}
    scales = {"name": "scales", "dtype": "float32", "shape": [4]}
    quantized = {"spec": spec, "shape": [4, 64], "codes": codes, "scales": scales}
    qchunks = [{"chunk": {"tensor": i, "offset": 0, "data": base64.b64encode(t.numpy().tobytes()).decode()}}
               for i, t in enumerate((want.codes, want.scales))]
    requests = {
        "Quantize": [{"header": {"tensor": tensor, "spec": spec}}, chunk],
        "Dequantize": [{"header": {"operand": quantized, "out_dtype": "float32"}}] + qchunks,
        "Matmul": [{"header": {"a": {"quantized": quantized}, "b": {"quantized": quantized}, "out_dtype": "float32"}}]
                  + qchunks + [{"chunk": {**c["chunk"], "tensor": c["chunk"]["tensor"] + 2}} for c in qchunks],
        "GetServerInfo": {},
        # the region RPCs, in declaration order: a session, a region registered in it, released, the status after
        "OpenSession": {},
        "RegisterRegion": lambda: {"session": session(), "size": 4096, "nonce": nonce,
                                   "memfd": {"pid": os.getpid(), "fd": region}},
        # the tensors in that region: x at 1024, its codes and scales at 2048 and 2560, then dequantized and
        # multiplied from there into 3072 and 2688
        "QuantizeInMemory": lambda: {"tensor": tensor, "spec": spec, "regions": refs([(1024, 1024)],
                                                                                     [(2048, 256), (2560, 16)])},
        "DequantizeInMemory": lambda: {"operand": quantized, "out_dtype": "float32",
                                       "regions": refs([(2048, 256), (2560, 16)], [(3072, 1024)])},
        "MatmulInMemory": lambda: {"a": {"quantized": quantized}, "b": {"quantized": quantized},
                                   "out_dtype": "float32", "regions": refs([(2048, 256), (2560, 16)] * 2, [(2688, 64)])},
        "UnregisterRegion": lambda: {"session": session(), "region": answers["RegisterRegion"]["region"]},
        "RegionStatus": lambda: {"session": session()},
        "CloseSession": lambda: {"session": session()},
    }
    region = os.memfd_create("region", os.MFD_ALLOW_SEALING)  # a memory file sealed against shrinking
    os.ftruncate(region, 4096)
    fcntl.fcntl(region, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    nonce = os.urandom(32)
    os.pwrite(region, nonce, 0)
    os.pwrite(region, x.numpy().tobytes(), 1024)
    nonce = base64.b64encode(nonce).decode()
    session = lambda: answers["OpenSession"][0]["session"]  # noqa: E731

    def refs(inputs, outputs):
        named = lambda spans: [{"region": answers["RegisterRegion"]["region"], "offset": o, "size": n}  # noqa: E731
                               for o, n in spans]
        return {"session": session(), "inputs": named(inputs), "outputs": named(outputs)}
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "quantd.v1.Quantd" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("quantd.v1.Quantd")
        assert {m.name for m in service.methods} == set(requests)
        answers = {}
        for method in service.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming:
                call = channel.stream_stream(path, request_serializer=request_class.SerializeToString,
                                             response_deserializer=response_class.FromString)
                messages = [json_format.ParseDict(r, request_class()) for r in requests[method.name]]
                answers[method.name] = [json_format.MessageToDict(m) for m in call(iter(messages), timeout=30)]
            elif method.server_streaming:  # OpenSession: its first event; the session lasts while the call is open
                call = channel.unary_stream(path, request_serializer=request_class.SerializeToString,
                                            response_deserializer=response_class.FromString)
                session_call = call(json_format.ParseDict(requests[method.name], request_class()))
                answers[method.name] = [json_format.MessageToDict(next(session_call))]
            else:
                call = channel.unary_unary(path, request_serializer=request_class.SerializeToString,
                                           response_deserializer=response_class.FromString)
                request = requests[method.name]() if callable(requests[method.name]) else requests[method.name]
                answers[method.name] = json_format.MessageToDict(call(json_format.ParseDict(request, request_class()), timeout=30))
        session_call.cancel()
    written = os.pread(region, 4096, 0)
    os.close(region)
    def payload(answer, tensor=0):
        return b"".join(base64.b64decode(m["chunk"]["data"]) for m in answer if "chunk" in m and m["chunk"].get("tensor", 0) == tensor)
    assert payload(answers["Quantize"], 0) == want.codes.numpy().tobytes()
    assert payload(answers["Quantize"], 1) == want.scales.numpy().tobytes()
    assert payload(answers["Dequantize"]) == reference.dequantize(want, torch.float32).numpy().tobytes()
    assert payload(answers["Matmul"]) == reference.matmul(want, want, torch.float32).numpy().tobytes()
    assert "int8_asym" in answers["GetServerInfo"]["formats"]
    assert written[2048:2304] == want.codes.numpy().tobytes() and written[2560:2576] == want.scales.numpy().tobytes()
    assert written[3072:4096] == reference.dequantize(want, torch.float32).numpy().tobytes()
    assert written[2688:2752] == reference.matmul(want, want, torch.float32).numpy().tobytes()
    assert [answers[rpc]["bytes"] for rpc in ("QuantizeInMemory", "DequantizeInMemory", "MatmulInMemory")] == [
        ["256", "16"], ["1024"], ["64"]]
    assert answers["RegisterRegion"]["region"] and answers["UnregisterRegion"] == {}
    assert answers["RegionStatus"] == {}  # no regions left in the session, none on the server
    assert answers["CloseSession"] == {}


class SlowUpload:
    """A tensor sent in two halves with a pause between them (until released)."""

    def __init__(self, x):
        self.x, self.release = x, threading.Event()
        self.started = threading.Event()

    def requests(self):
        data = self.x.numpy().tobytes()
        half = len(data) // 2
        yield pb.QuantizeRequest(header=pb.QuantizeHeader(tensor=pb.TensorInfo(name="x", dtype="float32", shape=list(self.x.shape)),
                                                          spec=pb.QuantSpec(format="fp8_e4m3")))
        yield pb.QuantizeRequest(chunk=pb.Chunk(offset=0, data=data[:half]))
        self.started.set()
        self.release.wait(30)
        yield pb.QuantizeRequest(chunk=pb.Chunk(offset=half, data=data[half:]))


def finish(call):
    try:
        return [m for m in call], grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return None, exc.code()


def test_drain_finishes_streams_in_flight_and_refuses_new_ones():
    running = BackgroundServer(config(drain_seconds=20))
    x = torch.randn(64, 128)
    channel = grpc.insecure_channel(running.target)
    stub = quantd_pb2_grpc.QuantdStub(channel)
    upload = SlowUpload(x)
    call = stub.Quantize(upload.requests(), timeout=60)
    assert next(call).WhichOneof("kind") == "header"
    drained = threading.Thread(target=running.call, args=(running.server.drain(),))
    drained.start()
    deadline = time.monotonic() + 10
    while not running.server.servicer.draining:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health_status(running.target) == NOT_SERVING
    with QuantdClient(running.target, retries=0) as c, pytest.raises(QuantdError) as info:
        c.quantize(x)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details
    upload.release.set()
    responses, code = finish(call)
    assert code == grpc.StatusCode.OK and responses[-1].WhichOneof("kind") == "summary"
    drained.join(30)
    assert not drained.is_alive()
    channel.close()
    running.stop()


def test_retries_go_to_another_replica():
    draining, live = BackgroundServer(config()), BackgroundServer(config())
    draining.server.servicer.draining = True  # answers every stream with UNAVAILABLE
    x = torch.randn(32, 256)
    try:
        with QuantdClient([draining.target, live.target], retries=5) as c:
            for _ in range(4):
                got = c.quantize(x, report=False)
                assert torch.equal(got.codes.view(torch.uint8), reference.quantize(x, QuantSpec()).codes.view(torch.uint8))
    finally:
        draining.stop()
        live.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quantd_serve_drains_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "QUANTD_DRAIN_SECONDS": "20", "QUANTD_CPU_COMPILE": "off"}
    process = subprocess.Popen([sys.executable, "-m", "quantd.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--device", "cpu"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if health_status(target) == SERVING:
                    break
            except grpc.RpcError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.2)
        with grpc.insecure_channel(target) as channel:
            upload = SlowUpload(torch.randn(64, 128))
            call = quantd_pb2_grpc.QuantdStub(channel).Quantize(upload.requests(), timeout=60)
            assert next(call).WhichOneof("kind") == "header"
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert health_status(target) == NOT_SERVING
            assert process.poll() is None  # still draining the stream in flight
            upload.release.set()
            responses, code = finish(call)
            assert code == grpc.StatusCode.OK and responses[-1].WhichOneof("kind") == "summary"
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
