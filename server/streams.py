"""Chunked streams: incoming chunks into staging buffers, outgoing tensors into chunks.

Incoming bytes are copied once, from the message into a buffer allocated for the whole
tensor when the header arrives (pinned when the server computes on a GPU, so the copy to
the device is a DMA). Outgoing tensors are cut into chunk_bytes slices of their bytes.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import torch

from quantd.client import wire
from quantd.client.crc32c import combine, crc32c
from quantd.v1 import quantd_pb2 as pb

from .errors import ServiceError, invalid

class StagingPool:
    """Staging buffers kept between streams, up to `idle_bytes` of idle ones.

    The first write to freshly allocated memory page-faults at ~1.5 GB/s, slower than the
    network delivers bytes; a reused buffer takes the copy at memory speed. Used from the
    event loop thread only. `lent` counts the bytes held by streams in flight.
    """

    def __init__(self, idle_bytes: int, pin: bool):
        self.idle_bytes = idle_bytes
        self.pin = pin
        self.idle: list = []
        self.lent = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` (at most twice as large, so big buffers stay for big tensors)."""
        fits = [i for i, b in enumerate(self.idle) if nbytes <= b.numel() <= 2 * nbytes]
        if fits:
            buf = self.idle.pop(min(fits, key=lambda i: self.idle[i].numel()))
        elif self.pin:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # page-locked: already resident
        else:
            buf = torch.zeros(nbytes, dtype=torch.uint8)  # page faults taken in parallel, not per chunk
        self.lent += buf.numel()
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.lent -= buf.numel()
        if 0 < buf.numel() <= self.idle_bytes:
            self.idle.append(buf)
        while sum(b.numel() for b in self.idle) > self.idle_bytes:
            self.idle.pop(0)  # the least recently returned goes back to the system


class StreamAssembler:
    """Receives the chunks of the tensors `infos` declares, in order, into buffers from `pool`.

    release() hands the buffers back; the received tensors must not be used after it.
    """

    def __init__(self, infos, *, max_bytes: int, pool: StagingPool):
        self.infos = list(infos)
        sizes = [wire.info_nbytes(info) for info in self.infos]
        total = sum(sizes)
        if total > max_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the stream declares {total} bytes of tensors, over this server's limit of "
                               f"{max_bytes} bytes (max_tensor_bytes)")
        for info in self.infos:
            wire.dtype_from_name(info.dtype)
        self.pool = pool
        self._owned = [pool.take(n) for n in sizes]
        self.buffers = [buf[:n] for buf, n in zip(self._owned, sizes)]
        self._arrays = [buf.numpy() for buf in self.buffers]
        self.received = [0] * len(sizes)

    def _name(self, index: int) -> str:
        return self.infos[index].name or f"#{index}"

    async def add(self, chunk: pb.Chunk) -> tuple:
        """Copy `chunk` into its buffer; returns (tensor index, bytes). ServiceError for a chunk that does not fit."""
        index, data = chunk.tensor, chunk.data  # each read of .data copies the bytes: read it once
        if index >= len(self.infos):
            raise invalid(f"chunk for tensor #{index}, but the header declares {len(self.infos)} tensor(s)")
        size, expected, n = len(self._arrays[index]), self.received[index], len(data)
        name = self._name(index)
        if chunk.offset < expected:
            raise invalid(f"chunk of tensor {name!r} at offset {chunk.offset} overlaps bytes already received "
                          f"(next expected offset {expected})")
        if chunk.offset > expected:
            raise invalid(f"chunk of tensor {name!r} at offset {chunk.offset} is out of order: bytes "
                          f"{expected}..{chunk.offset} are missing")
        if expected + n > size:
            raise invalid(f"byte count mismatch: chunk of tensor {name!r} ends at byte {expected + n}, "
                          f"past the {size} bytes its dtype and shape declare")
        if chunk.HasField("crc32c"):
            actual = await asyncio.to_thread(crc32c, data)
            if actual != chunk.crc32c:
                raise ServiceError(grpc.StatusCode.DATA_LOSS,
                                   f"CRC32C mismatch in chunk of tensor {name!r} at offset {chunk.offset}: "
                                   f"computed {actual:#010x}, the chunk says {chunk.crc32c:#010x}")
        self._arrays[index][expected:expected + n] = np.frombuffer(data, dtype=np.uint8)
        self.received[index] = expected + n
        return index, n

    def check_complete(self) -> None:
        for index, buf in enumerate(self.buffers):
            if self.received[index] != len(buf):
                raise invalid(f"byte count mismatch: the stream ended after {self.received[index]} of the "
                              f"{len(buf)} bytes of tensor {self._name(index)!r} (missing chunks)")

    def release(self) -> None:
        for buf in self._owned:
            self.pool.give(buf)
        self._owned, self.buffers, self._arrays = [], [], []

    def tensor(self, index: int) -> torch.Tensor:
        """The received tensor `index` (a view of its staging buffer)."""
        return wire.tensor_from_buffer(self.buffers[index], self.infos[index])


async def chunks_of(requests, header_field: str):
    """(header, async iterator of Chunk) of a request stream whose first message must be the header."""
    iterator = requests.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        raise invalid("empty request stream: the first message must be a header") from None
    if first.WhichOneof("kind") != header_field:
        raise invalid(f"the first message of the stream must be a header, got {first.WhichOneof('kind')}")

    async def chunks():
        async for message in iterator:
            if message.WhichOneof("kind") != "chunk":
                raise invalid(f"expected a chunk after the header, got {message.WhichOneof('kind')}")
            yield message.chunk
    return getattr(first, header_field), chunks()


class OutputSender:
    """Cuts output tensors into Chunk messages (wrapped in `response_type`) and keeps the Summary figures."""

    def __init__(self, response_type, infos, *, chunk_bytes: int, checksums: bool, metrics=None):
        self.response_type = response_type
        self.infos = list(infos)
        self.chunk_bytes = chunk_bytes
        self.checksums = checksums
        self.metrics = metrics
        self.sent = [0] * len(self.infos)
        self.crcs = [0] * len(self.infos)

    def header(self):
        return self.response_type(header=pb.OutputHeader(tensors=self.infos, scale_layout="row_major"))

    async def send(self, index: int, tensor: torch.Tensor):
        """Yield the next bytes of output `index` (a CPU tensor continuing where the last one ended)."""
        data = wire.tensor_bytes(tensor)
        for start in range(0, len(data), self.chunk_bytes):
            piece = bytes(data[start:start + self.chunk_bytes])
            response = self.response_type()
            chunk = response.chunk  # filled in place: constructing with chunk=... would copy the bytes again
            chunk.tensor, chunk.offset, chunk.data = index, self.sent[index], piece
            if self.checksums:
                crc = await asyncio.to_thread(crc32c, piece)
                chunk.crc32c = crc
                self.crcs[index] = combine(self.crcs[index], crc, len(piece))
            self.sent[index] += len(piece)
            if self.metrics is not None:
                self.metrics.add_bytes("out", len(piece))
            yield response

    def summary(self, report: dict | None = None):
        summary = pb.Summary(bytes=self.sent, crc32c=self.crcs if self.checksums else [])
        if report is not None:
            summary.report.CopyFrom(pb.Report(**report))
        return self.response_type(summary=summary)
