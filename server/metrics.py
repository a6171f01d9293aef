"""Prometheus metrics for the quantd server, and the interceptor that records every RPC (and writes its access log line).

Metrics(registry=None) owns its own CollectorRegistry (so several servers in one process, as in tests, stay apart):
  quantd_requests_total{service,rpc,code}      finished RPCs by final status
  quantd_request_seconds{service,rpc}          wall time of an RPC, first byte in to status out
  quantd_kernel_seconds{rpc}                   compute time of quantize/dequantize/matmul (observe_kernel_seconds)
  quantd_bytes_total{direction="in"|"out"}     tensor payload bytes streamed (add_bytes)
  quantd_active_streams                        RPCs in flight (stream_started/stream_finished)
  quantd_replayed_calls_total{rpc,graph}       memory calls served from a replay plan (server.replay), graph
                                               "true" where a CUDA graph launched their kernels (replayed)
  quantd_kernel_launch_plans_total{outcome}    the process's Triton quantize/dequantize calls: "replayed" from
                                               a launch plan (kernels.plans), "recorded", "ran" without one
  quantd_device_requests_in_flight{device}     requests computing on each of the server's devices (watch_devices)
  quantd_device_bytes_in_flight{device}        their tensor bytes
  quantd_device_requests_total{device}         requests placed on each device
  quantd_gpu_memory_allocated_bytes{device}    torch.cuda.memory_allocated, read at scrape time
  quantd_gpu_memory_reserved_bytes{device}     torch.cuda.memory_reserved, read at scrape time
start_http(port) serves them as Prometheus text on http://<addr>:<port>/metrics.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import sys
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import logs

DIRECTIONS = ("in", "out")
# An RPC moves up to gigabytes over a ~1 GB/s link: seconds to minutes. Kernels take microseconds to seconds.
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
KERNEL_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60)


@dataclasses.dataclass
class _RequestBytes:
    """Payload bytes of the RPC being served, summed from add_bytes() calls made while serving it."""
    inbound: int = 0
    outbound: int = 0


# Set by the interceptor for each RPC; grpc.aio serves each RPC in its own task, so add_bytes() calls from the
# servicer (or tasks it spawns, which copy the context) land on that RPC's counters.
_request_bytes: contextvars.ContextVar[_RequestBytes | None] = contextvars.ContextVar("quantd_request_bytes", default=None)


def split_method(method: str) -> tuple[str, str]:
    """'/quantd.v1.Quantd/Quantize' -> ('quantd.v1.Quantd', 'Quantize')."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    return service, rpc


class _GpuMemoryCollector:
    """Reads CUDA memory at scrape time. Reports nothing without CUDA; never initialises CUDA itself."""

    def collect(self):
        allocated = GaugeMetricFamily("quantd_gpu_memory_allocated_bytes",
                                      "GPU memory held by tensors (torch.cuda.memory_allocated)", labels=["device"])
        reserved = GaugeMetricFamily("quantd_gpu_memory_reserved_bytes",
                                     "GPU memory held by the caching allocator (torch.cuda.memory_reserved)",
                                     labels=["device"])
        torch = sys.modules.get("torch")  # the server has imported it; a scrape should not pay for the import
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
                reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class _KernelPlansCollector:
    """How the Triton backend's quantize / dequantize calls of this process ran (kernels.plans.counts), at scrape
    time: "replayed" from a launch plan, "recorded" (a key's first call), "ran" (a body a plan cannot replay)."""

    def collect(self):
        family = CounterMetricFamily("quantd_kernel_launch_plans", "Triton backend calls by how their kernels launched",
                                     labels=["outcome"])
        plans = sys.modules.get("quantd.kernels.plans")  # loaded with the Triton backend, not before
        for outcome in ("replayed", "recorded", "ran"):
            family.add_metric([outcome], 0 if plans is None else plans.counts[outcome])
        yield family


class _DeviceLoadCollector:
    """Each device's load (server.placement.Placement), read at scrape time."""

    def __init__(self, placement):
        self.placement = placement

    def collect(self):
        families = {field: GaugeMetricFamily(f"quantd_device_{field}", help_, labels=["device"]) for field, help_ in (
            ("requests_in_flight", "Requests computing on the device"),
            ("bytes_in_flight", "Tensor bytes of the requests computing on the device"))}
        placed = CounterMetricFamily("quantd_device_requests", "Requests placed on the device", labels=["device"])
        for load in self.placement.loads:
            for field, family in families.items():
                family.add_metric([load.name], getattr(load, field))
            placed.add_metric([load.name], load.requests_total)
        yield from families.values()
        yield placed


class Metrics:
    """The server's metrics, in `registry` (a fresh CollectorRegistry when None)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("quantd_requests", "Finished RPCs by final status code",
                                ["service", "rpc", "code"], registry=self.registry)
        self.request_seconds = Histogram("quantd_request_seconds", "Wall time of an RPC",
                                         ["service", "rpc"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.kernel_seconds = Histogram("quantd_kernel_seconds", "Compute time of quantize, dequantize and matmul",
                                        ["rpc"], buckets=KERNEL_BUCKETS, registry=self.registry)
        self.bytes = Counter("quantd_bytes", "Tensor payload bytes streamed in and out",
                             ["direction"], registry=self.registry)
        self.active_streams = Gauge("quantd_active_streams", "RPCs in flight", registry=self.registry)
        self.replays = Counter("quantd_replayed_calls", "Memory calls served from a replay plan",
                               ["rpc", "graph"], registry=self.registry)
        for direction in DIRECTIONS:  # both series exist from the start, at 0
            self.bytes.labels(direction)
        self.registry.register(_GpuMemoryCollector())
        self.registry.register(_KernelPlansCollector())
        self.http_server = None
        self.http_port: int | None = None

    # -- called by the servicer -------------------------------------------------------------------------------------
    def add_bytes(self, direction: str, n: int) -> None:
        """Counts `n` payload bytes received ("in") or sent ("out"), also towards the current RPC's access line."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
        if n < 0:
            raise ValueError(f"byte count must be >= 0, got {n}")
        self.bytes.labels(direction).inc(n)
        current = _request_bytes.get()
        if current is not None:
            if direction == "in":
                current.inbound += n
            else:
                current.outbound += n

    def observe_kernel_seconds(self, rpc: str, seconds: float) -> None:
        """Records the compute time of one quantize/dequantize/matmul call made for `rpc`."""
        self.kernel_seconds.labels(rpc).observe(seconds)

    def replayed(self, rpc: str, graph: bool) -> None:
        """One call of `rpc` served from its replay plan, its kernels launched from a CUDA graph or not."""
        self.replays.labels(rpc, "true" if graph else "false").inc()

    def watch_devices(self, placement) -> None:
        """Report the load of each of `placement`'s devices (quantd_device_*{device})."""
        self.registry.register(_DeviceLoadCollector(placement))

    def stream_started(self) -> None:
        self.active_streams.inc()

    def stream_finished(self) -> None:
        self.active_streams.dec()

    # -- HTTP endpoint ----------------------------------------------------------------------------------------------
    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serves /metrics on addr:port from a daemon thread; returns the bound port (port 0 picks a free one)."""
        if self.http_server is not None:
            raise RuntimeError(f"metrics HTTP endpoint already running on port {self.http_port}")
        self.http_server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.http_port = self.http_server.server_port
        return self.http_port

    def stop_http(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None
            self.http_port = None

    # -- gRPC -------------------------------------------------------------------------------------------------------
    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """A server interceptor recording each RPC's final status and wall time, and writing its access log line.
        Put it first in the server's interceptor list so calls rejected by later interceptors are counted too."""
        return _MetricsInterceptor(self)

    def finish(self, method: str, code: str, started: float, peer: str | None,
               request_bytes: _RequestBytes | None = None) -> None:
        """Record a finished call of `method` ("/package.Service/Rpc"), started at perf_counter() `started`: its
        access log line, its count by status `code` and its seconds."""
        request_bytes = request_bytes or _RequestBytes()
        service, rpc = split_method(method)
        seconds = time.perf_counter() - started
        # the access line first: a call that shows in the counters has been logged
        logs.log_request(rpc=rpc, status=code, seconds=seconds, bytes_in=request_bytes.inbound,
                         bytes_out=request_bytes.outbound, peer=peer)
        self.requests.labels(service, rpc, code).inc()
        self.request_seconds.labels(service, rpc).observe(seconds)


# The client's deadline passes before the server's (which starts when the request arrives): a call that fails this
# close to its deadline was ended by it, even if the handler saw a cancellation or a cut request stream first.
DEADLINE_SLACK_SECONDS = 0.5


def _final_code(context, error: BaseException | None) -> str:
    """The status the client saw, from what the handler did (returned, set_code, abort, raised, cancelled)."""
    code = context.code()  # a grpc.StatusCode once set_code or abort set one, else None
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the call ended before the handler did
        name = "CANCELLED"
    elif code is not None and code != grpc.StatusCode.OK:
        name = code.name
    elif error is not None and not isinstance(error, grpc.aio.AbortError):
        name = "UNKNOWN"  # grpc turns an unhandled exception into UNKNOWN
    else:
        return "OK"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining < DEADLINE_SLACK_SECONDS else name


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behavior(handler):
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, name)
        if fn is not None:
            return fn
    raise TypeError(f"RPC method handler without a behavior: {handler!r}")


def wrap_handler(handler, wrap_fn, *, parse_requests: bool = True):
    """The same kind of grpc.RpcMethodHandler as `handler`, with its behavior replaced by wrap_fn(behavior);
    parse_requests=False drops the request deserializer (the new behavior gets raw bytes)."""
    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(wrap_fn(_behavior(handler)),
                   request_deserializer=handler.request_deserializer if parse_requests else None,
                   response_serializer=handler.response_serializer)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        metrics = self._metrics

        def start(context):
            logs.begin_request(context)
            request_bytes = _RequestBytes()
            _request_bytes.set(request_bytes)
            return time.perf_counter(), request_bytes

        def wrap(behavior):
            # Response-streaming behaviors are async generators (or coroutines using context.write); the wrapper
            # must be the same kind so grpc drives it the same way.
            if inspect.isasyncgenfunction(behavior):
                async def observed_stream(request, context):
                    started, request_bytes = start(context)
                    peer = context.peer()  # read now: after a call is cancelled by its deadline, peer() can segfault
                    code = "OK"
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as exc:
                        code = _final_code(context, exc)  # the code, not the exception: its frames hold the call's buffers
                        raise
                    else:
                        code = _final_code(context, None)
                    finally:
                        metrics.finish(method, code, started, peer, request_bytes)
                return observed_stream

            async def observed(request, context):
                started, request_bytes = start(context)
                peer = context.peer()
                code = "OK"
                try:
                    result = behavior(request, context)
                    result = await result if inspect.isawaitable(result) else result
                    code = _final_code(context, None)
                    return result
                except BaseException as exc:
                    code = _final_code(context, exc)
                    raise
                finally:
                    metrics.finish(method, code, started, peer, request_bytes)
            return observed

        return wrap_handler(handler, wrap)
