"""The quantd server: the servicer plus health, reflection, security, metrics and a graceful drain.

    quantd serve [--host --port --device ...]     (see ServerConfig for every setting)

On SIGTERM (or SIGINT) the server reports NOT_SERVING, answers new streams with UNAVAILABLE,
lets the streams in flight finish for up to drain_seconds, then stops.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import multiprocessing
import os
import signal
import tempfile
import threading

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from quantd.kernels import cpu
from quantd.protocol import chunks
from quantd.v1 import quantd_pb2

from . import logs, security
from .config import ServerConfig
from .local import LocalSocket, socket_path
from .metrics import Metrics
from .servicer import INSTANCE, QuantdServicer

log = logging.getLogger("quantd.server")
SERVICE = chunks.SERVICE
SERVICE_NAME = SERVICE.full_name
COMPUTE_THREADS = 2  # one piece computing while the next one's bytes are copied to the device


def pick_devices(name: str) -> list[torch.device]:
    """The devices `name` (ServerConfig.device) means: one, or for "all" and lists a pool of GPUs."""
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return [torch.device("cpu")]
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    present = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if name == "all":
        return present
    if name in ("auto", "cuda"):
        return [torch.device("cuda", 0)]  # what "cuda" means in a fresh process
    devices = [torch.device(part.strip()) for part in name.split(",")]
    for device in devices:
        if device.index is not None and device.index >= len(present):
            raise ValueError(f"device {device} asked for, but this host has {', '.join(map(str, present))}")
    if len(set(devices)) < len(devices):
        raise ValueError(f"device {name!r} names a GPU more than once")
    return devices


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_servicer(servicer: QuantdServicer, server: grpc.aio.Server) -> None:
    """Register the servicer's RPCs. Streaming ones get their request messages as raw bytes (the servicer decodes
    them with quantd.protocol.chunks, which takes chunks apart without protobuf's copies of the payload) and send
    encoded chunks as they are; the wire format is the generated code's, so any quantd.v1 client works."""
    handlers = {}
    for method in SERVICE.methods:
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behavior, response_serializer=chunks.serialize)
        elif method.server_streaming:
            request, response = (getattr(quantd_pb2, t.name) for t in (method.input_type, method.output_type))
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=response.SerializeToString)
        else:
            request, response = (getattr(quantd_pb2, t.name) for t in (method.input_type, method.output_type))
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=request.FromString, response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class BindError(RuntimeError):
    """An address the server cannot listen on (its port taken by another process, or not this machine's)."""


class QuantdServer:
    """One server; start() binds it, drain() winds it down. Usable from any running event loop."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.devices = pick_devices(config.device)
        cpu.use_compiler(config.cpu_compile == "on")  # the process's CPU backend (a setting of the process)
        self.metrics = metrics or Metrics()
        # each device computes in threads of its own: a busy GPU does not hold up requests placed on another
        self.executors = [concurrent.futures.ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix=f"quantd-{d}")
                          for d in self.devices]
        self.servicer = QuantdServicer(config, self.devices, self.executors, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.local: LocalSocket | None = None
        self.port: int | None = None
        self.stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind and start serving; returns the port (a free one when config.port is 0)."""
        interceptors = [self.metrics.interceptor()]
        auth = security.auth_interceptor(self.config)
        if auth is not None:
            interceptors.append(auth)
        # gRPC itself cuts only messages over twice the limit (the handler then sees a bare cancellation); up to that,
        # the servicer refuses them with a status it records (streams.chunks_of)
        options = [("grpc.max_receive_message_length", 2 * self.config.max_message_bytes),
                   ("grpc.max_send_message_length", -1),
                   # clients ping every few seconds to find frozen replicas (quantd.client.channels.KEEPALIVE_OPTIONS)
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000), ("grpc.http2.max_ping_strikes", 0),
                   ("grpc.so_reuseport", 1)]  # gRPC's default on Linux, relied upon by serve_workers
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = security.server_credentials(self.config)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC's "Failed to bind", which says no more
            await self.server.stop(None)
            raise BindError(f"cannot listen on {address}: the port is taken, or the host is not an address of "
                            "this machine") from None
        if self.config.metrics_port:
            metrics_host = self.config.metrics_host or self.config.host
            try:
                self.metrics.start_http(self.config.metrics_port, metrics_host)
            except OSError as exc:
                await self.server.stop(None)
                raise BindError(f"cannot serve metrics on {metrics_host}:{self.config.metrics_port}: "
                                f"{exc.strerror or exc}") from None
        await self.server.start()
        await self._start_local_socket()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        uncompiled = ", CPU backend uncompiled" if self.config.cpu_compile == "off" else ""
        log.info("quantd serving on %s:%d (device %s%s)", self.config.host, self.port,
                 ", ".join(map(str, self.devices)), uncompiled)
        if credentials is None and auth is None and not is_loopback(self.config.host):
            log.warning("serving on %s without TLS or tokens: anyone who reaches this address can use the server "
                        "(set QUANTD_TLS_CERT_FILE/QUANTD_TLS_KEY_FILE or QUANTD_AUTH_TOKENS)", self.config.host)
        return self.port

    async def _start_local_socket(self) -> None:
        """Listen for same-host memory calls on a Unix socket (server.local), unless local_socket_dir is "off"."""
        if self.config.local_socket_dir == "off":
            return
        path = socket_path(self.config.local_socket_dir or tempfile.gettempdir(), self.port, INSTANCE)
        local = LocalSocket(self.servicer, self.metrics, path, self.config.max_message_bytes)
        try:
            await local.start()
        except OSError as exc:
            log.warning("no local socket at %s (%s): same-host memory calls go through gRPC", path, exc)
            return
        self.local, self.servicer.local_socket = local, path

    async def drain(self, seconds: float | None = None) -> None:
        """NOT_SERVING, refuse new streams, wait up to `seconds` (drain_seconds) for the streams in flight, stop."""
        seconds = self.config.drain_seconds if seconds is None else seconds
        self.servicer.draining = True
        self.servicer.sessions_end.set()
        await self.health.enter_graceful_shutdown()
        log.info("draining %d stream(s) for up to %.1f s", self.servicer.active_streams, seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.servicer.active_streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # let calls that just ended finish their interceptors before the server goes
        if self.local is not None:
            await self.local.stop()
        await self.server.stop(grace=max(0.0, deadline - loop.time()))
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop_http()
        self.stopped.set()

    async def wait(self) -> None:
        await self.stopped.wait()


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM/SIGINT, then drain it."""
    server = QuantdServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    draining = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: draining or draining.append(asyncio.ensure_future(server.drain())))
    await server.wait()


def main(config: ServerConfig) -> None:
    logs.configure(config.log_format)
    if config.workers > 1:
        return serve_workers(config)
    try:
        asyncio.run(serve(config))
    except BindError as exc:
        raise SystemExit(f"quantd serve: {exc}") from None


def serve_workers(config: ServerConfig) -> None:
    """config.workers server processes on one port: SO_REUSEPORT lets the kernel spread connections over them, so
    parallel streams on several connections are served by several processes (and their GIL-bound gRPC loops).
    Worker i serves metrics on metrics_port + i. SIGTERM/SIGINT are passed on; returns when every worker exited."""
    if config.port == 0:
        raise ValueError("workers > 1 needs a fixed port (port 0 would give each worker a port of its own)")
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads or CUDA state
    workers = [context.Process(target=main, name=f"quantd-worker-{i}", args=(dataclasses.replace(
        config, workers=1, metrics_port=config.metrics_port and config.metrics_port + i),)) for i in range(config.workers)]
    for worker in workers:
        worker.start()

    def forward(signum, _frame):
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    for worker in workers:
        worker.join()


class BackgroundServer:
    """A server on its own event loop in a daemon thread, for embedding (notebooks, tests, benchmarks).

        with BackgroundServer(ServerConfig(host="127.0.0.1", port=0)) as server:
            client = QuantdClient(server.target)
    """

    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="quantd-server", daemon=True)
        self.thread.start()
        self.server = self.call(self._create(config))
        self.port = self.call(self.server.start())
        self.target = f"{config.host}:{self.port}"

    @staticmethod
    async def _create(config):
        return QuantdServer(config)  # created on the server's loop

    def call(self, coroutine, timeout: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, drain_seconds: float = 5.0) -> None:
        if not self.server.stopped.is_set():
            self.call(self.server.drain(drain_seconds))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
