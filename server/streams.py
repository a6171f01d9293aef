"""Chunked streams: incoming chunks into staging buffers, outgoing tensors into chunks.

Request messages arrive as raw bytes and quantd.protocol.chunks takes the chunks apart without
copying them; their bytes are then copied once, into a buffer allocated for the whole tensor
when the header arrives (pinned when the server computes on a GPU, so the copy to the device
is a DMA). Outgoing tensors are cut into chunk_bytes slices of their bytes, each copied once,
into the encoded message.
"""
from __future__ import annotations

import asyncio

import grpc
import torch

from quantd.protocol import chunks, wire
from quantd.protocol.crc32c import crc32c
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
        self.pool = pool
        self._owned = [pool.take(n) for n in sizes]
        self.buffers = [buf[:n] for buf, n in zip(self._owned, sizes)]
        self.reader = chunks.ChunkReader([buf.numpy() for buf in self.buffers], [info.name for info in self.infos])

    @property
    def received(self) -> list:
        return self.reader.received

    async def add(self, chunk: chunks.Chunk) -> tuple:
        """Copy `chunk` into its buffer; returns (tensor index, bytes). ValueError for a chunk that does not
        fit, ChecksumMismatch for one whose CRC32C is wrong."""
        self.reader.check(chunk)
        if chunk.crc32c is not None:
            await asyncio.to_thread(self.reader.verify, chunk)
        return chunk.tensor, self.reader.store(chunk)

    def check_complete(self) -> None:
        self.reader.check_complete()

    def release(self) -> None:
        for buf in self._owned:
            self.pool.give(buf)
        self._owned, self.buffers = [], []
        self.reader.buffers = []  # the buffers may go to another stream now: nothing more is copied into them

    def tensor(self, index: int) -> torch.Tensor:
        """The received tensor `index` (a view of its staging buffer)."""
        return wire.tensor_from_buffer(self.buffers[index], self.infos[index])


async def chunks_of(requests, request_type):
    """(header, async iterator of Chunk) of a stream of raw `request_type` messages whose first must be the header."""
    iterator = requests.__aiter__()
    try:
        first = chunks.decode(await iterator.__anext__(), request_type)
    except StopAsyncIteration:
        raise invalid("empty request stream: the first message must be a header") from None
    if chunks.kind(first) != "header":
        raise invalid(f"the first message of the stream must be a header, got {chunks.kind(first)}")

    async def received():
        async for raw in iterator:
            message = chunks.decode(raw, request_type)
            if not isinstance(message, chunks.Chunk):
                raise invalid(f"expected a chunk after the header, got {chunks.kind(message)}")
            yield message
    return first.header, received()


class OutputSender:
    """Cuts output tensors into chunk messages of `response_type` and keeps the Summary figures."""

    def __init__(self, response_type, infos, *, chunk_bytes: int, checksums: bool, metrics=None):
        self.response_type = response_type
        self.infos = list(infos)
        self.checksums = checksums
        self.metrics = metrics
        self.writer = chunks.ChunkWriter(len(self.infos), chunk_bytes)

    def header(self):
        return self.response_type(header=pb.OutputHeader(tensors=self.infos, scale_layout="row_major"))

    async def send(self, index: int, tensor: torch.Tensor):
        """Yield the next bytes of output `index` (a CPU tensor continuing where the last one ended)."""
        for piece in self.writer.pieces(wire.tensor_bytes(tensor)):
            crc = await asyncio.to_thread(crc32c, piece) if self.checksums else None
            if self.metrics is not None:
                self.metrics.add_bytes("out", len(piece))
            yield self.writer.message(index, piece, crc)

    def summary(self, report: dict | None = None, written: list | None = None):
        """The Summary; `written`: bytes per output written into regions instead of sent."""
        summary = pb.Summary(bytes=self.writer.sent if written is None else written,
                             crc32c=self.writer.crcs if self.checksums else [])
        if report is not None:
            summary.report.CopyFrom(pb.Report(**report))
        return self.response_type(summary=summary)
