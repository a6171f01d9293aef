"""The local socket's framing, for the server and the client alike: each message (LocalRequest one way,
LocalResponse the other, quantd.proto) is 4 bytes of little-endian length and then the message.

A client on the server's host sends its memory calls (the *InMemory RPCs: tensors in shared-memory regions or CUDA
IPC memory) on the server's Unix socket (ServerInfo.local_socket) instead of through gRPC, whose round trip in
Python costs about a millisecond; the socket's costs tens of microseconds.
"""
from __future__ import annotations

import socket

from quantd.v1 import quantd_pb2 as pb

LENGTH_BYTES = 4
# In the RESOURCE_EXHAUSTED of a connection past the server's bound (it closes it): the client's call goes through
# gRPC instead
BUSY = "connections at once"
# LocalRequest's header field for each memory call, and back
FIELDS = {"Quantize": "quantize", "Dequantize": "dequantize", "Matmul": "matmul"}
RPCS = {field: rpc for rpc, field in FIELDS.items()}


def frame(message) -> bytes:
    """A message as the socket carries it: its length, then its bytes."""
    body = message.SerializeToString()
    return len(body).to_bytes(LENGTH_BYTES, "little") + body


def length(head: bytes) -> int:
    return int.from_bytes(head, "little")


def request(rpc: str, header) -> pb.LocalRequest:
    return pb.LocalRequest(**{FIELDS[rpc]: header})


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a blocking socket; ConnectionError when it closes first."""
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"the local socket closed after {got} of {n} bytes")
        got += k
    return bytes(buffer)
