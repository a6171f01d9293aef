"""Real gRPC servers for the operations tests (security, metrics, deployment, failover).

echo_server(...)    in this process: health, reflection and a tiny raw-bytes echo service (quantd.test.Echo/Unary
                    and /Stream) built with the given credentials and interceptors, to test interceptors on any
                    kind of RPC.
ServerProcess(...)  `quantd serve` as a child process on 127.0.0.1, configured like a container is (QUANTD_*
                    variables and flags), that a test can SIGTERM or SIGKILL.
(The quantd server in this process: quantd.server.app.BackgroundServer.)
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.parser import text_string_to_metric_families

from quantd.server.healthcheck import check

ECHO_SERVICE = "quantd.test.Echo"
UNARY = f"/{ECHO_SERVICE}/Unary"
STREAM = f"/{ECHO_SERVICE}/Stream"


class ServerThread:
    """Runs `start()` (a coroutine function returning the bound port) in a fresh event loop on its own thread;
    stop() runs `stop_fn()` in that loop and joins the thread."""

    def __init__(self, start, stop_fn):
        self._start, self._stop_fn = start, stop_fn
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(60) or self.error is not None:
            raise RuntimeError(f"test server did not start: {self.error!r}")

    async def _run(self):
        self._stop = asyncio.Event()
        try:
            self.port = await self._start()
        except BaseException as exc:  # reported by the constructor
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        # stop inside this coroutine: once it returns, the loop runs nothing more
        await self._stop_fn()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "test server did not stop"
        self._loop.close()


async def _echo_unary(request: bytes, context) -> bytes:
    return request[::-1]


async def _echo_stream(request_iterator, context):
    async for chunk in request_iterator:
        yield chunk[::-1]


def echo_server(credentials=None, interceptors=(), extra_handlers=None, address="127.0.0.1:0") -> ServerThread:
    """Health, reflection and the echo service on `address`; `extra_handlers` maps more method names of
    quantd.test.Echo to grpc.RpcMethodHandlers."""
    server = None

    async def start() -> int:
        nonlocal server
        server = grpc.aio.server(interceptors=list(interceptors))
        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(_echo_unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream), **(extra_handlers or {})}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
        reflection.enable_server_reflection((ECHO_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        return port

    return ServerThread(start, lambda: server.stop(0))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a child process that cannot report the one it bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quantd_command() -> list[str]:
    """The `quantd` console script installed beside this Python (what the image's ENTRYPOINT runs)."""
    script = Path(sys.executable).with_name("quantd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "quantd.cli"]


# Runs argv[1:] as its child and prints that child's ru_maxrss (KiB) last. The extra process matters: a child
# forked from a big process (a test that has just generated a model) and then exec'd reports the parent's
# peak as its own ru_maxrss, so the measured process must be forked from a small one.
_RSS_LAUNCHER = """import os, subprocess, sys
_, status, usage = os.wait4(subprocess.Popen(sys.argv[1:]).pid, 0)
print(f"ru_maxrss_kib={usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))"""


def run_measuring_rss(command: list[str], log: Path) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of `command`, its stdout and stderr written to `log`."""
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-c", _RSS_LAUNCHER, *command], stdout=out, stderr=subprocess.STDOUT)
    last = log.read_text().rstrip().rsplit("\n", 1)[-1]
    return code, int(last.removeprefix("ru_maxrss_kib=")) * 1024


class ServerProcess:
    """`quantd serve --host 127.0.0.1 --port <free> --device cpu [args]` with QUANTD_* `env` on top of this
    process's environment; waits until its health service says SERVING. Its log goes to a temporary file.
    Its CPU backend runs uncompiled (QUANTD_CPU_COMPILE=off, unless `env` or this environment says otherwise): the
    same bits, without importing inductor and compiling in every server process (about 10 CPU-seconds each); the
    compiled graphs are tested in process (test_cpu_backend, the service tests' in-process servers).
    rss() is its resident memory. A free port can be taken by another process (a client's ephemeral port, a
    parallel test) before the server binds it: a server that exits saying so is started again on other ports
    (BIND_RETRIES times)."""

    BIND_RETRIES = 3

    def __init__(self, *args: str, env: dict | None = None, metrics: bool = False, wait: bool = True,
                 host: str | None = "127.0.0.1"):
        self._args, self._env, self._metrics, self._host = list(args), env, metrics, host
        self._binds_left = self.BIND_RETRIES
        self._start()
        if wait:  # wait=False: start several, then wait_serving() on each
            self.wait_serving()

    def _start(self) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if self._metrics else None
        command = quantd_command() + ["serve", "--port", str(self.port), "--device", "cpu"]
        if self._host is not None:  # None: the default host
            command += ["--host", self._host]
        if self._metrics:
            command += ["--metrics-port", str(self.metrics_port)]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="quantd-serve-", suffix=".log")
        env = {"QUANTD_CPU_COMPILE": "off", **os.environ, **(self._env or {})}
        self.proc = subprocess.Popen(command + self._args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text()

    def health(self, timeout: float = 2.0) -> str:
        """SERVING / NOT_SERVING as the health service says, or the gRPC error's code name."""
        try:
            return check(self.target, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name

    def wait_serving(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self.health(timeout=1.0) != "SERVING":
            if self.proc.poll() is not None:
                if "quantd serve: cannot " in self.log() and self._binds_left > 0:
                    self._binds_left -= 1  # app.BindError: its port was taken meanwhile
                    self._start()
                    continue
                raise RuntimeError(f"quantd serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"quantd serve not SERVING after {seconds} s:\n{self.log()}")
            time.sleep(0.1)

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def scrape(self) -> dict:
        """{(sample name, frozenset(labels)): value} scraped from the server's metrics endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self) -> None:
        self.kill()
        self._log.close()
