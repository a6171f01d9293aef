"""Memory calls on the server's local socket (ServerInfo.local_socket; the framing in quantd.protocol.local).

A client whose shared-memory session is open (so it shares the server's host) sends its memory calls here instead
of through gRPC: the same header and Summary, without gRPC's round trip. Failures raise LocalSocketError, a
grpc.RpcError with the call's status code and details, so that callers handle both paths alike.
"""
from __future__ import annotations

import socket
import threading

import grpc

from quantd.protocol import local
from quantd.v1 import quantd_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class LocalSocketError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LocalSocket:
    """One connection to a server's local socket; calls take turns on it. A call that fails on the connection
    (deadline, server gone) closes it, so no late answer is read as the next call's; `broken` then says why."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.broken = ""

    def call(self, rpc: str, header, deadline: float | None) -> pb.Summary:
        """The Summary of memory call `rpc` ("Quantize", "Dequantize", "Matmul") on `header`, within `deadline`
        seconds (None: no limit)."""
        message = local.frame(local.request(rpc, header))
        with self.lock:
            if self.sock is None:
                raise LocalSocketError(grpc.StatusCode.UNAVAILABLE, f"the local socket {self.path}: {self.broken}")
            try:
                if deadline is not None and deadline <= 0:
                    raise TimeoutError
                self.sock.settimeout(deadline)
                try:
                    self.sock.sendall(message)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered and closed before reading (past its bound): its answer is queued
                n = local.length(local.recv_exactly(self.sock, local.LENGTH_BYTES))
                response = pb.LocalResponse.FromString(local.recv_exactly(self.sock, n))
            except TimeoutError:
                self._close("a call ran past its deadline")
                raise LocalSocketError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"{rpc} on the local socket: deadline exceeded") from None
            except OSError as exc:  # ConnectionError included: the server went away
                self._close(f"closed ({exc})")
                raise LocalSocketError(grpc.StatusCode.UNAVAILABLE,
                                       f"{rpc} on the local socket {self.path}: {exc}") from None
        if response.code:
            raise LocalSocketError(_CODES.get(response.code, grpc.StatusCode.UNKNOWN), response.details)
        return response.summary

    def _close(self, why: str) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.broken = None, why

    def close(self) -> None:
        with self.lock:
            self._close("closed by the client")
