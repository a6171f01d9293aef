"""Chunked streams: incoming chunks into staging buffers, outgoing tensors into chunks.

Request messages arrive as raw bytes and quantd.protocol.chunks takes the chunks apart without
copying them; their bytes are then copied once, into a buffer for the whole tensor taken when
its first chunk arrives (pinned when the server computes on a GPU, so the copy to the device
is a DMA). Outgoing tensors are cut into chunk_bytes slices of their bytes, each copied once,
into the encoded message.

Each admitted stream reserves the bytes of its input and output tensors in the server's
MemoryBudget; StreamMemory gives them back, and frees its buffers, however the stream ends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes

import grpc
import torch

from quantd.protocol import chunks, wire
from quantd.protocol.crc32c import crc32c
from quantd.v1 import quantd_pb2 as pb

from .errors import ServiceError, invalid

MIN_CHUNK_BYTES = 4096  # smallest chunk_bytes a request may ask for: smaller ones cost a message per few bytes

class StagingPool:
    """Staging buffers kept between streams, up to `idle_bytes` of idle ones.

    The first write to freshly allocated memory page-faults at ~1.5 GB/s, slower than the
    network delivers bytes; a reused buffer takes the copy at memory speed. A fresh buffer is
    not filled: the system gives it memory page by page as the received bytes are written.
    Used from the event loop thread only. `lent` counts the bytes held by streams in flight.
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
            buf = torch.empty(nbytes, dtype=torch.uint8)
        self.lent += buf.numel()
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.lent -= buf.numel()
        if 0 < buf.numel() <= self.idle_bytes:
            self.idle.append(buf)
        else:
            self._free(buf)
        while sum(b.numel() for b in self.idle) > self.idle_bytes:
            self._free(self.idle.pop(0))  # the least recently returned goes back to the system

    def _free(self, buf: torch.Tensor) -> None:
        """Give the memory back now: views of the buffer can outlive the stream in the frames of an exception's
        traceback, which only the garbage collector frees."""
        storage = buf.untyped_storage()
        if storage.resizable():  # not an empty tensor's, nor pinned memory (which stays in torch's host cache)
            storage.resize_(0)


class MemoryBudget:
    """The bytes that the streams in flight may hold together; each reserves its share when it is admitted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def reserve(self, nbytes: int) -> None:
        if self.used + nbytes > self.limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the stream needs {nbytes} bytes of memory, but the streams in flight hold {self.used} "
                               f"of this server's {self.limit} (max_memory_bytes); retry later or on another replica")
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class StreamMemory:
    """What one admitted stream holds: its share of the budget, its staging buffers and the computations reading
    them. close() waits for those computations, then frees the buffers and the share, however the stream ended."""

    def __init__(self, budget: MemoryBudget, pool: StagingPool, nbytes: int):
        budget.reserve(nbytes)
        self.budget, self.pool, self.nbytes = budget, pool, nbytes
        self.assemblers: list = []
        self.computing: set = set()

    def assembler(self, infos) -> "StreamAssembler":
        self.assemblers.append(StreamAssembler(infos, pool=self.pool))
        return self.assemblers[-1]

    def track(self, future: concurrent.futures.Future) -> None:
        """A computation reading this stream's buffers: they are freed only once it is done."""
        self.computing.add(future)
        future.add_done_callback(self.computing.discard)

    async def settled(self) -> None:
        """Wait for the computations reading and writing this stream's memory: a cancelled call leaves its
        computation running in its thread."""
        running = [asyncio.wrap_future(f) for f in list(self.computing)]
        if running:
            await asyncio.wait(running)

    async def close(self) -> None:
        await self.settled()
        received = bool(self.assemblers)
        for assembler in self.assemblers:
            assembler.release()
        self.assemblers = []
        self.budget.release(self.nbytes)
        if received and self.nbytes >= TRIM_BYTES:  # memory calls (shm, CUDA IPC) allocate no chunks: nothing to trim
            await asyncio.to_thread(trim_heap)
        self.nbytes = 0


# A stream of this many bytes or more that received its tensors in chunks gives the free memory of the heap back to
# the system when it ends.
TRIM_BYTES = 64 << 20


def trim_heap() -> None:
    """Return the free pages of the C heap to the system (glibc malloc_trim, which also releases free pages
    inside each arena). A stream's chunk messages are allocated and freed by the megabyte on gRPC's threads: the
    allocator keeps what they leave between live allocations, and after a stream cut short by a cancel or a
    deadline (many messages in flight at once) that can be hundreds of MiB of resident memory."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


try:
    _LIBC = ctypes.CDLL(None)
except OSError:  # pragma: no cover (no C library to load)
    _LIBC = None


class StreamAssembler:
    """Receives the chunks of the tensors `infos` declares, in order, into buffers from `pool`, each taken when
    the tensor's first chunk arrives.

    release() hands the buffers back; the received tensors must not be used after it.
    """

    def __init__(self, infos, *, pool: StagingPool):
        self.infos = list(infos)
        self.sizes = [wire.info_nbytes(info) for info in self.infos]
        self.pool = pool
        self._owned = [None] * len(self.infos)
        self.reader = chunks.ChunkReader([None] * len(self.infos), [info.name for info in self.infos], self.sizes)

    @property
    def received(self) -> list:
        return self.reader.received

    async def add(self, chunk: chunks.Chunk) -> tuple:
        """Copy `chunk` into its buffer; returns (tensor index, bytes). ValueError for a chunk that does not
        fit, ChecksumMismatch for one whose CRC32C is wrong."""
        self.reader.check(chunk)
        if chunk.crc32c is not None:
            await asyncio.to_thread(self.reader.verify, chunk)
        self.buffer(chunk.tensor)
        return chunk.tensor, self.reader.store(chunk)

    def buffer(self, index: int) -> torch.Tensor:
        """The staging buffer of tensor `index` (its exact size), taken from the pool at the first call."""
        if self._owned[index] is None:
            self._owned[index] = self.pool.take(self.sizes[index])
            self.reader.buffers[index] = self._owned[index][:self.sizes[index]].numpy()
        return self._owned[index][:self.sizes[index]]

    def check_complete(self) -> None:
        self.reader.check_complete()

    def release(self) -> None:
        for buf in self._owned:
            if buf is not None:
                self.pool.give(buf)
        self._owned = [None] * len(self.infos)
        # the buffers may go to another stream now: nothing more is copied into them
        self.reader.buffers = [None] * len(self.infos)

    def tensor(self, index: int) -> torch.Tensor:
        """The received tensor `index` (a view of its staging buffer)."""
        return wire.tensor_from_buffer(self.buffer(index), self.infos[index])


async def chunks_of(requests, request_type, *, idle_seconds: float, max_message_bytes: int):
    """(header, async iterator of Chunk) of a stream of raw `request_type` messages whose first must be the header.

    A client that sends no message for `idle_seconds` while one is awaited gets DEADLINE_EXCEEDED; a message over
    `max_message_bytes`, RESOURCE_EXHAUSTED."""
    iterator = requests.__aiter__()

    async def next_message():
        try:
            raw = await asyncio.wait_for(iterator.__anext__(), idle_seconds)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no request message for {idle_seconds:g} s (stream_idle_seconds)") from None
        if len(raw) > max_message_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a request message of {len(raw)} bytes, over this server's limit of {max_message_bytes} "
                               f"(max_message_bytes): send smaller chunks")
        return raw

    try:
        first = chunks.decode(await next_message(), request_type)
    except StopAsyncIteration:
        raise invalid("empty request stream: the first message must be a header") from None
    if chunks.kind(first) != "header":
        raise invalid(f"the first message of the stream must be a header, got {chunks.kind(first)}")

    async def received():
        while True:
            try:
                raw = await next_message()
            except StopAsyncIteration:
                return
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
        self.placement = ""  # Summary.placement: where the call computed and why

    def header(self):
        return self.response_type(header=pb.OutputHeader(tensors=self.infos, scale_layout="row_major"))

    async def send(self, index: int, tensor: torch.Tensor):
        """Yield the next bytes of output `index` (a CPU tensor continuing where the last one ended)."""
        for piece in self.writer.pieces(wire.tensor_bytes(tensor)):
            crc = await asyncio.to_thread(crc32c, piece) if self.checksums else None
            if self.metrics is not None:
                self.metrics.add_bytes("out", len(piece))
            yield self.writer.message(index, piece, crc)

    def summary(self, report: dict | None = None, written: list | None = None, amax=None):
        """The Summary; `written`: bytes per output written into regions instead of sent; `amax`: the input's (a
        0-d tensor), when asked for."""
        summary = pb.Summary(bytes=self.writer.sent if written is None else written,
                             crc32c=self.writer.crcs if self.checksums else [],
                             amax=None if amax is None else float(amax),
                             placement=self.placement)
        if report is not None:
            summary.report.CopyFrom(pb.Report(**report))
        return self.response_type(summary=summary)
