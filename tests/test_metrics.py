"""Prometheus metrics scraped over HTTP and structured access logs, from real gRPC calls."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_harness import ECHO_SERVICE, echo_server, free_port
from prometheus_client.parser import text_string_to_metric_families

from quantd.client import QuantdClient
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server import logs
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.server.metrics import Metrics


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} from http://127.0.0.1:port/metrics, plus the family names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {"families": set()}
    for family in text_string_to_metric_families(text):
        samples["families"].add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_once_counted(port: int, calls: int, seconds: float = 30) -> dict:
    """A scrape taken once the server has counted `calls` finished RPCs in all. A client can see a call's status
    a moment before the server's interceptor records it (an abort sends the status at once; a deadline cancels
    the handler later), so wait for the count rather than racing it."""
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(port)
        counted = sum(v for k, v in samples.items() if isinstance(k, tuple) and k[0] == "quantd_requests_total")
        if counted >= calls or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)


@pytest.fixture
def quantd_logger():
    """Restores the "quantd" logger after a test that configures it (so later tests' log capture still works)."""
    logger = logging.getLogger("quantd")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture
def log_lines(quantd_logger):
    """Configures JSON logs into a buffer; returns a function giving the parsed lines so far."""
    buffer = io.StringIO()
    logs.configure("json", stream=buffer)
    return lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]


class Instrumented:
    """The echo server plus handlers that behave like the quantd servicer (bytes, kernel time, active streams)
    or end in each kind of status, all reporting to one Metrics whose HTTP endpoint is up."""

    def __init__(self):
        self.metrics = Metrics()
        self.release = threading.Event()  # holds the Hold stream open until set
        self.port = self.metrics.start_http(0)
        metrics = self.metrics
        release = self.release

        async def transfer(request_iterator, context):
            metrics.stream_started()
            try:
                async for chunk in request_iterator:
                    metrics.add_bytes("in", len(chunk))
                    metrics.observe_kernel_seconds("Transfer", 0.002)
                    logging.getLogger("quantd.servicer").info("chunk received")
                    metrics.add_bytes("out", 2 * len(chunk))
                    yield chunk + chunk
            finally:
                metrics.stream_finished()

        async def hold(request, context):
            metrics.stream_started()
            try:
                while not release.is_set():
                    await asyncio.sleep(0.01)
                return b"released"
            finally:
                metrics.stream_finished()

        async def invalid(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad chunk order")

        async def set_code(request, context):
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("no such tensor")
            return b""

        async def crash(request, context):
            raise RuntimeError("kernel exploded")

        async def stall(request, context):
            await asyncio.sleep(60)
            return b""

        self.server = echo_server(interceptors=[self.metrics.interceptor()], extra_handlers={
            "Transfer": grpc.stream_stream_rpc_method_handler(transfer),
            "Hold": grpc.unary_unary_rpc_method_handler(hold),
            "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
            "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
            "Stall": grpc.unary_unary_rpc_method_handler(stall),
        })
        self.channel = grpc.insecure_channel(self.server.target)

    def call(self, method: str, payload=b"x", **kwargs):
        return self.channel.unary_unary(f"/{ECHO_SERVICE}/{method}")(payload, timeout=kwargs.pop("timeout", 10),
                                                                      **kwargs)

    def close(self):
        self.release.set()
        self.channel.close()
        self.server.stop()
        self.metrics.stop_http()


@pytest.fixture
def instrumented():
    served = Instrumented()
    yield served
    served.close()


def test_requests_bytes_kernel_time_and_latency(instrumented):
    chunks = [bytes([i]) * (1000 + i) for i in range(5)]
    replies = list(instrumented.channel.stream_stream(f"/{ECHO_SERVICE}/Transfer")(iter(chunks), timeout=10))
    assert replies == [c + c for c in chunks]
    assert instrumented.call("Unary", b"abc") == b"cba"
    with pytest.raises(grpc.RpcError):
        instrumented.call("Invalid")

    samples = scrape_once_counted(instrumented.port, 3)
    sent = sum(map(len, chunks))
    assert value(samples, "quantd_bytes_total", direction="in") == sent
    assert value(samples, "quantd_bytes_total", direction="out") == 2 * sent
    assert value(samples, "quantd_requests_total", service=ECHO_SERVICE, rpc="Transfer", code="OK") == 1
    assert value(samples, "quantd_requests_total", service=ECHO_SERVICE, rpc="Unary", code="OK") == 1
    assert value(samples, "quantd_requests_total", service=ECHO_SERVICE, rpc="Invalid",
                 code="INVALID_ARGUMENT") == 1
    assert value(samples, "quantd_request_seconds_count", service=ECHO_SERVICE, rpc="Transfer") == 1
    assert value(samples, "quantd_request_seconds_sum", service=ECHO_SERVICE, rpc="Transfer") > 0
    assert value(samples, "quantd_kernel_seconds_count", rpc="Transfer") == 5
    assert value(samples, "quantd_kernel_seconds_sum", rpc="Transfer") == pytest.approx(0.01)
    # 0.002 s lands in the 0.005 bucket and above, not in 0.001
    assert value(samples, "quantd_kernel_seconds_bucket", rpc="Transfer", le="0.001") == 0
    assert value(samples, "quantd_kernel_seconds_bucket", rpc="Transfer", le="0.005") == 5
    assert value(samples, "quantd_active_streams") == 0


def test_final_status_of_every_kind(instrumented):
    expected = {"Invalid": grpc.StatusCode.INVALID_ARGUMENT, "SetCode": grpc.StatusCode.NOT_FOUND,
                "Crash": grpc.StatusCode.UNKNOWN}
    for method, code in expected.items():
        with pytest.raises(grpc.RpcError) as info:
            instrumented.call(method)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as info:
        instrumented.call("Stall", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as info:
        instrumented.channel.unary_unary("/quantd.test.Echo/Missing")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    samples = scrape_once_counted(instrumented.port, 4)
    for method, code in {**expected, "Stall": grpc.StatusCode.DEADLINE_EXCEEDED}.items():
        assert value(samples, "quantd_requests_total", service=ECHO_SERVICE, rpc=method, code=code.name) == 1, method
    assert value(samples, "quantd_requests_total", service=ECHO_SERVICE, rpc="Missing", code="UNIMPLEMENTED") is None


def test_active_streams_gauge(instrumented):
    pending = instrumented.channel.unary_unary(f"/{ECHO_SERVICE}/Hold").future(b"", timeout=30)
    while value(scrape(instrumented.port), "quantd_active_streams") != 1:
        assert not pending.done(), pending.exception()
    instrumented.release.set()
    assert pending.result() == b"released"
    assert value(scrape(instrumented.port), "quantd_active_streams") == 0


def test_gpu_memory_gauge_families_are_exposed(instrumented):
    samples = scrape(instrumented.port)
    assert {"quantd_gpu_memory_allocated_bytes", "quantd_gpu_memory_reserved_bytes"} <= samples["families"]
    if not torch.cuda.is_initialized():  # nothing to report, and the scrape must not initialise CUDA
        assert not any(isinstance(k, tuple) and k[0].startswith("quantd_gpu_memory") for k in samples)
        assert not torch.cuda.is_initialized()


@pytest.mark.gpu
def test_gpu_memory_gauge_reads_the_allocator(instrumented):
    x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    samples = scrape(instrumented.port)
    assert value(samples, "quantd_gpu_memory_allocated_bytes", device="0") >= x.numel()
    assert value(samples, "quantd_gpu_memory_reserved_bytes", device="0") >= x.numel()
    del x


@pytest.mark.gpu
def test_quantd_server_on_gpu_reports_its_memory(rng):
    """The real server on CUDA: a quantize through the client shows in the requests, bytes, kernel time and the
    GPU memory gauges."""
    port = free_port()
    x = torch.randn(1024, 4096, generator=rng).to(torch.bfloat16)
    spec = QuantSpec("fp8_e4m3", group_size=128)
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cuda", metrics_port=port)) as server:
        with QuantdClient(server.target, timeout=300) as client:
            qt = client.quantize(x, spec, report=False)
        samples = scrape_once_counted(port, 1)
    expected = reference.quantize(x, spec)
    assert torch.equal(qt.codes.view(torch.uint8), expected.codes.view(torch.uint8))
    assert torch.equal(qt.scales, expected.scales)
    assert value(samples, "quantd_requests_total", service="quantd.v1.Quantd", rpc="Quantize", code="OK") == 1
    assert value(samples, "quantd_bytes_total", direction="in") == x.numel() * x.element_size()
    assert value(samples, "quantd_kernel_seconds_count", rpc="Quantize") >= 1
    assert value(samples, "quantd_gpu_memory_reserved_bytes", device="0") > 0
    assert value(samples, "quantd_gpu_memory_allocated_bytes", device="0") is not None
    launched = sum(value(samples, "quantd_kernel_launch_plans_total", outcome=o) for o in ("replayed", "recorded"))
    assert launched >= 1  # the Triton backend's calls, each replayed or recorded


def test_metrics_endpoint_lifecycle(rng):
    from quantd.kernels import plans, triton_quantize
    metrics = Metrics()
    port = metrics.start_http(0)
    with pytest.raises(RuntimeError, match="already running"):
        metrics.start_http(0)
    assert "quantd_active_streams" in scrape(port)["families"]
    before = value(scrape(port), "quantd_kernel_launch_plans_total", outcome="replayed")
    plans.clear()
    x = torch.randn(8, 128, generator=rng)
    for _ in range(3):  # the Triton backend (interpreted here): recorded once, then replayed
        triton_quantize.quantize(x, QuantSpec())
    samples = scrape(port)
    assert value(samples, "quantd_kernel_launch_plans_total", outcome="replayed") == before + 2
    assert value(samples, "quantd_kernel_launch_plans_total", outcome="recorded") >= 1
    metrics.stop_http()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    with pytest.raises(ValueError, match="direction"):
        metrics.add_bytes("sideways", 1)


def test_access_log_lines_carry_request_id(instrumented, log_lines):
    metadata = (("x-request-id", "job-42/step-7"),)
    replies = list(instrumented.channel.stream_stream(f"/{ECHO_SERVICE}/Transfer")(
        iter([b"abcd", b"efgh"]), metadata=metadata, timeout=10))
    assert replies == [b"abcdabcd", b"efghefgh"]
    with pytest.raises(grpc.RpcError):
        instrumented.call("Invalid")
    instrumented.call("Unary")

    scrape_once_counted(instrumented.port, 3)  # the access line of a call is written when it is counted
    lines = log_lines()
    access = {line["rpc"]: line for line in lines if line["logger"] == "quantd.access"}
    assert {rpc: a["status"] for rpc, a in access.items()} == {"Transfer": "OK", "Invalid": "INVALID_ARGUMENT",
                                                               "Unary": "OK"}
    transfer, invalid, unary = access["Transfer"], access["Invalid"], access["Unary"]
    assert transfer["request_id"] == "job-42/step-7"
    assert (transfer["bytes_in"], transfer["bytes_out"]) == (8, 16)
    assert transfer["seconds"] >= 0 and transfer["level"] == "info" and "127.0.0.1" in transfer["peer"]
    assert invalid["level"] == "warning"
    # without x-request-id each call gets its own fresh id
    assert len({invalid["request_id"], unary["request_id"], transfer["request_id"]}) == 3
    assert all(len(a["request_id"]) == 32 for a in (invalid, unary))
    # the servicer's own log lines carry the id of the call they belong to, without passing it
    servicer = [line for line in lines if line["logger"] == "quantd.servicer"]
    assert [s["request_id"] for s in servicer] == ["job-42/step-7"] * 2


def test_text_log_format_and_bad_format(quantd_logger):
    buffer = io.StringIO()
    logs.configure("text", stream=buffer)
    logs.log_request(rpc="Quantize", status="OK", seconds=0.5, bytes_in=10, bytes_out=4, request_id="abc")
    logs.configure("text", stream=buffer)  # configuring again replaces the handler: no duplicate lines
    logging.getLogger("quantd.server").info("plain line")
    first, second = buffer.getvalue().splitlines()
    assert "INFO quantd.access rpc finished request_id=abc rpc=Quantize status=OK bytes_in=10 bytes_out=4" in first
    assert second.endswith("INFO quantd.server plain line")
    with pytest.raises(ValueError, match="log_format"):
        logs.configure("xml")


def test_recorded_status_is_the_one_the_client_saw(log_lines):
    """A stream cut by the client's deadline is recorded DEADLINE_EXCEEDED (not the CANCELLED or INVALID_ARGUMENT
    the handler saw); a request message over the limit is recorded RESOURCE_EXHAUSTED, as the client got it."""
    from quantd.protocol import wire
    from quantd.v1 import quantd_pb2 as pb

    config = ServerConfig(host="127.0.0.1", port=0, device="cpu")
    header = pb.QuantizeRequest(header=pb.QuantizeHeader(tensor=wire.tensor_info("input", torch.bfloat16, (64 << 20,)),
                                                         spec=wire.spec_to_proto(QuantSpec())))
    gate = threading.Event()

    def cut_by_deadline():
        yield header
        yield pb.QuantizeRequest(chunk=pb.Chunk(data=bytes(4096)))
        gate.wait(10)

    def oversized():
        yield header
        yield pb.QuantizeRequest(chunk=pb.Chunk(data=bytes(config.max_message_bytes + 1)))

    seen = []
    with BackgroundServer(config) as server, grpc.insecure_channel(server.target) as channel:
        quantize = channel.stream_stream("/quantd.v1.Quantd/Quantize", request_serializer=pb.QuantizeRequest.SerializeToString)
        for requests, timeout in ((cut_by_deadline(), 1.0), (oversized(), 30)):
            with pytest.raises(grpc.RpcError) as failed:
                list(quantize(requests, timeout=timeout))
            seen.append(failed.value.code().name)
            gate.set()
        registry = server.server.metrics.registry
        deadline = time.monotonic() + 30
        recorded = lambda code: registry.get_sample_value(  # noqa: E731
            "quantd_requests_total", {"service": "quantd.v1.Quantd", "rpc": "Quantize", "code": code}) or 0
        while recorded(seen[0]) + recorded(seen[1]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert seen == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]
    assert recorded("DEADLINE_EXCEEDED") == 1 and recorded("RESOURCE_EXHAUSTED") == 1
    access = [line["status"] for line in log_lines() if line["logger"] == "quantd.access" and line.get("rpc") == "Quantize"]
    assert access == seen
