"""The local socket: memory calls (tensors in shared-memory regions or CUDA IPC memory) from clients on this host,
on a Unix socket instead of gRPC (quantd.protocol.local has the framing and why).

Each server process listens on a socket of its own, named in ServerInfo.local_socket, created owner-only (0600:
the client that can open this process's regions runs as the same user). A call is served exactly as its *InMemory
RPC (QuantdServicer.serve_in_memory: the same admission, session and region checks, placement and draining), and
recorded in the access log and metrics under that RPC's name, its peer "unix:pid=<pid>". A call whose tensors are
not in a live session's memory is refused as on gRPC: sessions are opened over gRPC, where authentication applies.
A connection serves its calls one after another; a client that goes away mid-call ends the connection once the
call is done (its memory stays in use until then, as for a cancelled RPC).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
import time

import grpc
from google.protobuf.message import DecodeError

from quantd.protocol import local
from quantd.protocol.chunks import SERVICE
from quantd.v1 import quantd_pb2 as pb

from . import logs, replay
from .errors import status_of

log = logging.getLogger("quantd.server")
MAX_CONNECTIONS = 64  # connections served at once; more are answered RESOURCE_EXHAUSTED and closed


def socket_path(directory: str, port: int, instance: str) -> str:
    """The socket of the server process `instance` serving gRPC on `port` (unique among live servers)."""
    return os.path.join(directory, f"quantd-{port}-{instance}.sock")


class LocalSocket:
    def __init__(self, servicer, metrics, path: str, max_message_bytes: int):
        self.servicer, self.metrics, self.path = servicer, metrics, path
        self.max_message_bytes = max_message_bytes
        self.server: asyncio.AbstractServer | None = None
        self.connections: set = set()

    async def start(self) -> None:
        if os.path.exists(self.path) and stat.S_ISSOCK(os.stat(self.path).st_mode):
            os.unlink(self.path)  # a socket left by a process that died under this (random) name
        umask = os.umask(0o177)  # owner-only from the start: no window in which others may connect
        try:
            self.server = await asyncio.start_unix_server(self._connection, path=self.path)
        finally:
            os.umask(umask)

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        peer = _peer(writer)
        try:
            if len(self.connections) > MAX_CONNECTIONS:
                await self._answer(writer, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the local socket serves {MAX_CONNECTIONS} {local.BUSY}")
                return
            while True:
                n = local.length(await reader.readexactly(local.LENGTH_BYTES))
                if n > self.max_message_bytes:
                    await self._answer(writer, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"a LocalRequest of {n} bytes, over this server's max_message_bytes "
                                       f"({self.max_message_bytes})")
                    return  # the rest of the stream cannot be framed
                writer.write(await self._call(await reader.readexactly(n), peer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def _answer(self, writer, code: grpc.StatusCode, details: str) -> None:
        writer.write(local.frame(pb.LocalResponse(code=code.value[0], details=details)))
        await writer.drain()

    async def _call(self, body: bytes, peer: str) -> bytes:
        """The framed answer to the LocalRequest `body`: from its replay plan where the session has one for these
        bytes (server.replay), else served in full (and leaving a plan where it can be replayed)."""
        started = time.perf_counter()
        logs.begin_request(None)
        rpc, code = "LocalRequest", grpc.StatusCode.OK
        try:
            try:
                request = pb.LocalRequest.FromString(body)
            except DecodeError as exc:
                raise ValueError(f"LocalRequest: not a LocalRequest message ({exc})") from None
            field = request.WhichOneof("header")
            if field is None:
                raise ValueError("LocalRequest: no header (quantize, dequantize or matmul)")
            rpc = local.RPCS[field] + "InMemory"
            header = getattr(request, field)
            session = header.cuda.session if header.HasField("cuda") else None
            kept = self.servicer.regions.kept.get(session)
            plan = kept.plans.get(body) if kept is not None and self.servicer.regions.proves_host(session) else None
            if plan is not None:
                await self.servicer.replay(plan, kept)
                return plan.response
            offers = []
            token = replay.offers.set(offers)
            try:
                summary = await self.servicer.serve_in_memory(local.RPCS[field], header)
            finally:
                replay.offers.reset(token)
            response = local.frame(pb.LocalResponse(summary=summary))
            kept = self.servicer.regions.kept.get(session)  # the storages may have changed meanwhile
            keys = replay.keys(header.cuda) if offers else ()
            if offers and kept is not None and all(key in kept.storages for key in keys):
                kept.plans.add(body, replay.Plan(offers[0], response, keys))
            return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 (every failure gets a status)
            code, details = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s on the local socket", rpc, exc_info=exc)
            return local.frame(pb.LocalResponse(code=code.value[0], details=details))
        finally:
            self.metrics.finish(f"/{SERVICE.full_name}/{rpc}", code.name, started, peer)


def _peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"unix:pid={pid},uid={uid}"
    except (OSError, AttributeError):
        return "unix"
