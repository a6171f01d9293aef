"""Chunk messages on the wire, and the chunking of tensors both ends share.

Every message of the streaming RPCs is a oneof whose field 2 is a Chunk (protos/quantd/v1/quantd.proto).
Python protobuf copies a chunk's payload when it parses a message, again on each read of `.data`, and
again when it serializes one; at gigabytes per second those copies cost about as much as the transport.
So chunk messages are written and read here in protobuf's own encoding: encode() writes the wire bytes
with one copy of the payload, decode() hands the payload out as a view of the received bytes. Headers
and summaries still go through the generated classes, and so does any chunk message this reader does not
take apart itself (fields outside the chunk, a chunk field given twice, groups): protobuf decides those.
The bytes are protobuf's (tests/test_chunks.py compares both ways), so generated stubs and clients built
from reflection see no difference.

ChunkWriter cuts tensors into chunk messages; ChunkReader checks received chunks against the tensors
they belong to and copies them into place. The server and the client use both, in opposite directions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from quantd.v1 import quantd_pb2 as pb

from .crc32c import combine, crc32c

SERVICE = pb.DESCRIPTOR.services_by_name["Quantd"]
# The streaming RPCs' (request, response) classes, by name: their messages travel raw, chunks written and read here.
STREAMS = {m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
           for m in SERVICE.methods if m.client_streaming}

# protobuf wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5
CHUNK_FIELD = 2  # the Chunk's field number in every request and response message
TENSOR, OFFSET, DATA, CRC32C = 1, 2, 3, 4  # Chunk's fields
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_CHUNK_KEY = bytes([CHUNK_FIELD << 3 | LEN])


class Chunk(NamedTuple):
    """A received chunk: `data` is a view of the message it came in (valid as long as that message is)."""

    tensor: int
    offset: int
    data: memoryview | bytes
    crc32c: int | None = None


class ChecksumMismatch(Exception):
    """A chunk whose bytes do not have the CRC32C it carries."""


class _Unusual(Exception):
    """A valid-looking encoding this module leaves to protobuf (a group, a field of an unexpected wire type)."""


# ---- encoding --------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(tensor: int, offset: int, data, crc: int | None = None) -> bytes:
    """The wire bytes of a request or response message whose kind is this chunk, exactly as protobuf
    serializes it. `data` (bytes or a flat memoryview of bytes) is copied once, into the result."""
    n = len(data)
    fields = bytearray()
    if tensor:  # proto3: fields at their default value are left out
        fields += b"\x08" + _varint(tensor & _U32)
    if offset:
        fields += b"\x10" + _varint(offset & _U64)
    if n:
        fields += b"\x1a" + _varint(n)
    tail = b"" if crc is None else b"\x20" + _varint(crc & _U32)
    return b"".join((_CHUNK_KEY, _varint(len(fields) + n + len(tail)), fields, data, tail))


def serialize(message) -> bytes:
    """Serializer for grpc: encoded chunks (bytes) pass through, generated messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# ---- decoding --------------------------------------------------------------------------------


def _read_varint(raw: bytes, pos: int, end: int) -> tuple:
    """(value, position after it) of the varint at raw[pos]; ValueError when it is cut off or too long."""
    if pos < end and raw[pos] < 0x80:  # keys and small values: one byte
        return raw[pos], pos + 1
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _U64, i + 1
        shift += 7
    raise ValueError("a varint runs past the end of the message" if pos + 10 > end else "a varint longer than 10 bytes")


def _skip(raw: bytes, pos: int, end: int, wire_type: int) -> int:
    """The position after an unknown field's value (protobuf skips unknown fields)."""
    if wire_type == VARINT:
        return _read_varint(raw, pos, end)[1]
    if wire_type == LEN:
        n, pos = _read_varint(raw, pos, end)
        pos += n
    elif wire_type in (I64, I32):
        pos += 8 if wire_type == I64 else 4
    else:
        raise _Unusual
    if pos > end:
        raise ValueError("a field runs past the end of the message")
    return pos


def _chunk(raw: bytes, pos: int, end: int) -> Chunk:
    """The Chunk encoded in raw[pos:end]: fields in any order, repeated ones taking the last value, unknown
    ones skipped, as protobuf reads them."""
    view = memoryview(raw)
    tensor = offset = 0
    data, crc = view[pos:pos], None
    while pos < end:
        key, pos = _read_varint(raw, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0 or key > _U32:
            raise _Unusual
        if field in (TENSOR, OFFSET, CRC32C):
            if wire_type != VARINT:
                raise _Unusual
            value, pos = _read_varint(raw, pos, end)
            if field == TENSOR:
                tensor = value & _U32
            elif field == OFFSET:
                offset = value - (1 << 64) if value >> 63 else value  # int64: two's complement
            else:
                crc = value & _U32
        elif field == DATA:
            if wire_type != LEN:
                raise _Unusual
            n, pos = _read_varint(raw, pos, end)
            if pos + n > end:
                raise ValueError(f"the chunk's data ({n} bytes) runs past the end of the message")
            data, pos = view[pos:pos + n], pos + n
        else:
            pos = _skip(raw, pos, end, wire_type)
    return Chunk(tensor, offset, data, crc)


def decode(raw: bytes, message_type):
    """A received message of `message_type` (a generated request or response class): a Chunk whose data
    views `raw`, or else the parsed message (a header or a summary). ValueError for bytes that are not
    an encoding of message_type."""
    try:
        try:
            if raw[:1] == _CHUNK_KEY:
                n, pos = _read_varint(raw, 1, len(raw))
                if pos + n > len(raw):
                    raise ValueError(f"its chunk field ({n} bytes) runs past its end (truncated?)")
                if pos + n == len(raw):  # the chunk field alone, as every encoder writes it
                    return _chunk(raw, pos, pos + n)
        except _Unusual:
            pass
        message = message_type.FromString(raw)
    except (ValueError, DecodeError) as exc:
        raise ValueError(f"malformed {message_type.DESCRIPTOR.name} message ({len(raw)} bytes): {exc}") from None
    if message.WhichOneof("kind") == "chunk":
        c = message.chunk
        return Chunk(c.tensor, c.offset, c.data, c.crc32c if c.HasField("crc32c") else None)
    return message


def kind(message) -> str | None:
    """The oneof case of a decoded message: "chunk", "header", "summary" or None."""
    return "chunk" if isinstance(message, Chunk) else message.WhichOneof("kind")


# ---- tensors in chunks -----------------------------------------------------------------------


class ChunkWriter:
    """Cuts the bytes of `count` tensors into chunk messages of `chunk_bytes`, keeping what has been sent
    of each tensor and (for chunks that carry one) the CRC32C of all of it."""

    def __init__(self, count: int, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.sent = [0] * count
        self.crcs = [0] * count

    def pieces(self, data: memoryview):
        """Views of `data` (flat bytes) of chunk_bytes each, the last one shorter."""
        for start in range(0, len(data), self.chunk_bytes):
            yield data[start:start + self.chunk_bytes]

    def message(self, index: int, piece, crc: int | None = None) -> bytes:
        """The chunk message carrying `piece` as the next bytes of tensor `index`, with CRC32C `crc` if given."""
        offset = self.sent[index]
        self.sent[index] += len(piece)
        if crc is not None:
            self.crcs[index] = combine(self.crcs[index], crc, len(piece))
        return encode(index, offset, piece, crc)


class ChunkReader:
    """Copies received chunks into `buffers` (flat uint8 numpy arrays, one per tensor, of its exact size),
    after checking that each one continues its tensor. `names` name the tensors in error messages. With
    `sizes` given, a buffer may be None until its tensor's first chunk has been checked (the owner puts it
    in place before store())."""

    def __init__(self, buffers: list, names: list, sizes: list | None = None):
        self.buffers = buffers
        self.sizes = [len(b) for b in buffers] if sizes is None else list(sizes)
        self.names = [name or f"#{i}" for i, name in enumerate(names)]
        self.received = [0] * len(buffers)
        self.crcs = [0] * len(buffers)  # CRC32C of each tensor's verified chunks, as ChunkWriter keeps them

    def check(self, chunk: Chunk) -> None:
        """ValueError unless `chunk` is the next piece of a declared tensor and fits in it."""
        index, offset = chunk.tensor, chunk.offset
        if index >= len(self.buffers):
            raise ValueError(f"chunk for tensor #{index}, but the header declares {len(self.buffers)} tensor(s)")
        size, expected, name = self.sizes[index], self.received[index], self.names[index]
        if offset < expected:
            raise ValueError(f"chunk of tensor {name!r} at offset {offset} overlaps bytes already received "
                             f"(next expected offset {expected})")
        if offset > expected:
            raise ValueError(f"chunk of tensor {name!r} at offset {offset} is out of order: bytes "
                             f"{expected}..{offset} are missing")
        if expected + len(chunk.data) > size:
            raise ValueError(f"byte count mismatch: chunk of tensor {name!r} ends at byte {expected + len(chunk.data)}, "
                             f"past the {size} bytes its dtype and shape declare")

    def verify(self, chunk: Chunk) -> None:
        """ChecksumMismatch unless the chunk's bytes have the CRC32C it carries (call only when it carries one);
        a matching CRC joins its tensor's in `crcs`."""
        actual = crc32c(chunk.data)
        if actual != chunk.crc32c:
            raise ChecksumMismatch(f"CRC32C mismatch in chunk of tensor {self.names[chunk.tensor]!r} at offset "
                                   f"{chunk.offset}: computed {actual:#010x}, the chunk says {chunk.crc32c:#010x}")
        self.crcs[chunk.tensor] = combine(self.crcs[chunk.tensor], actual, len(chunk.data))

    def store(self, chunk: Chunk) -> int:
        """Copy a checked chunk into its buffer; returns its size."""
        start, n = self.received[chunk.tensor], len(chunk.data)
        self.buffers[chunk.tensor][start:start + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        self.received[chunk.tensor] = start + n
        return n

    def check_complete(self) -> None:
        """ValueError unless every tensor has all its bytes."""
        for index, size in enumerate(self.sizes):
            if self.received[index] != size:
                raise ValueError(f"byte count mismatch: the stream ended after {self.received[index]} of the "
                                 f"{size} bytes of tensor {self.names[index]!r} (missing chunks)")
