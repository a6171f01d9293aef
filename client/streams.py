"""Parallel streams: one Quantize split into independent pieces (quantd.protocol.pieces), each sent on a connection
of its own by a worker process, so that no one interpreter encodes and decodes every chunk.

The workers start on a client's first streams call, by spawn (gRPC forbids using channels in a forked copy of a
process that has them open), and each keeps a QuantdClient of its own. The input is copied once into a sealed
memory file of the client (transports.SealedMemory; none when it lies in a shm_tensor region already), which the
workers open through /proc as the server opens shm regions; each worker writes its piece's codes and scales
straight from the response chunks into one output memory file, whose mapping the returned tensors keep
(quantd.protocol.regions.exported). Workers end with the client's close() and when the client process dies (their pipe
ends).
A worker that dies in a call fails the call with UNAVAILABLE; the next call starts new workers.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import mmap
import os
import multiprocessing
import multiprocessing.connection
import threading

import grpc
import torch

from quantd.kernels.spec import QuantSpec
from quantd.protocol import regions as shared
from quantd.protocol import wire
from quantd.protocol.pieces import piece_scales, plan_pieces, unit_shape

from .api import QuantdClient, QuantdError
from .transports import HeldResults, SealedMemory


@dataclasses.dataclass(frozen=True)
class Job:
    """One piece for a worker: its input bytes in a memory file, where each output goes in another, the call."""
    source: tuple   # (path, size) of the input's memory file
    start: int      # byte offset of the piece in it
    dtype: torch.dtype
    shape: tuple
    target: tuple   # (path, size) of the output memory file
    outputs: dict   # {stored name: (byte offset, byte size)} of the piece's outputs in it
    spec: QuantSpec
    scales: object  # numpy float32 array or None (a numpy array pickles as bytes, a tensor through shared memory)
    amax: bool
    timeout: float | None


@dataclasses.dataclass(frozen=True)
class Claim:
    """Ask a worker to connect to a server process that no other worker is connected to (`taken`: their
    ServerInfo.instance), trying up to `tries` new connections (the processes of `quantd serve --workers N` share
    one port, and the kernel picks one for each connection); it answers the instance it got, one taken already
    when it found no other."""
    taken: frozenset
    tries: int = 64


class StreamWorkers:
    """`n` worker processes, each with a QuantdClient made of `settings` (QuantdClient's arguments), started on the
    first call."""

    MAX_TARGETS = 2

    def __init__(self, n: int, settings: dict):
        self.n, self.settings = n, settings
        self.workers: list = []  # (process, connection)
        self.staging: SealedMemory | None = None  # where inputs are copied, grown as needed
        self.targets: list = []  # HeldResults the outputs of the last calls went to
        self.lock = threading.Lock()

    def quantize(self, x: torch.Tensor, spec: QuantSpec, scales, amax: bool, timeout, regions=()):
        """({stored name: tensor}, amax or None) of the contiguous CPU tensor x; `regions`: ShmRegions x may lie in."""
        itemsize, unit = x.element_size(), unit_shape(spec, tuple(x.shape))[0]
        pieces = plan_pieces(spec, x.shape, -(-math.ceil(x.numel() / unit) // self.n) * unit * itemsize, itemsize)
        storage = {name: entry for name, entry in spec.storage(x.shape)._asdict().items() if entry is not None}
        offsets, end = shared.layout([nbytes(entry) for entry in storage.values()])
        with self.lock:
            if not all(process.is_alive() for process, _ in self.workers):
                self.close()  # one died between calls: start afresh
            if not self.workers:
                self._start()
            source, start = self._source(x, regions)
            target = self._target(max(end, 1))
            at, jobs = dict(zip(storage, offsets)), []
            for piece, piece_scale in zip(pieces, piece_scales(pieces, spec, scales)):
                outputs, piece_storage = {}, spec.storage(piece.shape)
                for name in storage:
                    outputs[name] = (at[name], nbytes(getattr(piece_storage, name)))
                    at[name] += outputs[name][1]
                jobs.append(Job((source.path, len(source.buf)), start + piece.start * itemsize, x.dtype,
                                piece.shape, (target.memory.path, target.size), outputs, spec,
                                None if piece_scale is None else piece_scale.numpy(), amax, timeout))
            found = self._run(jobs)
            out = target.results()
            if target not in self.targets:  # every kept one is held: this one goes with its results
                target.memory.close()
            return ({name: out[o:o + nbytes((s, d))].view(d).reshape(s)
                     for (name, (s, d)), o in zip(storage.items(), offsets)},
                    max(found) if amax else None)

    def _target(self, size: int) -> HeldResults:
        """Memory for a call's outputs: a free one of the last calls' that fits, else a new one (replacing the
        smallest free one when MAX_TARGETS are kept). Reused memory is mapped already, its pages in place."""
        free = [t for t in self.targets if t.free]
        fitting = [t for t in free if t.size >= size]
        if fitting:
            return min(fitting, key=lambda t: t.size)
        if free and len(self.targets) >= self.MAX_TARGETS:
            smallest = min(free, key=lambda t: t.size)
            self.targets.remove(smallest)
            smallest.memory.close()  # results of its calls keep their own mappings
        target = HeldResults(SealedMemory(size), size)
        if len(self.targets) < self.MAX_TARGETS:
            self.targets.append(target)
        return target

    def _source(self, x: torch.Tensor, regions):
        """(SealedMemory, byte offset) holding x's bytes: the shm_tensor region it lies in, else staging."""
        for region in regions:
            offset = region.offset_of(x)
            if offset is not None and isinstance(region.memory, SealedMemory):
                return region.memory, offset
        nbytes = x.numel() * x.element_size()
        if self.staging is None or len(self.staging.buf) < nbytes:
            if self.staging is not None:
                self.staging.close()
            self.staging = SealedMemory(max(nbytes, 1))
        shared.exported(self.staging.buf)[:nbytes].copy_(x.reshape(-1).view(torch.uint8))
        return self.staging, 0

    def _run(self, jobs: list, workers=None) -> list:
        """Each job to a worker of its own (of `workers`, default all); what they reply (amaxes, instances), or
        QuantdError for the first that failed or died. Any failure to hear from all of them ends the workers: a late
        reply must not answer the next call."""
        pending, found, failed = {}, [], None
        try:
            for (process, conn), job in zip(workers or self.workers, jobs):
                pending[conn] = process
                try:
                    conn.send(job)
                except OSError:
                    pass  # the worker is dead: its end reads as closed below
            while pending:
                for conn in multiprocessing.connection.wait(list(pending)):
                    process = pending.pop(conn)
                    try:
                        reply = conn.recv()
                    except (EOFError, ConnectionResetError):  # reset: it died with our message unread
                        process.join(5)
                        raise QuantdError(grpc.StatusCode.UNAVAILABLE, f"streams worker process {process.pid} died "
                                    f"(exit code {process.exitcode}) in the call; the next call starts new ones")
                    if reply[0] == "ok":
                        found.append(reply[1])
                    elif failed is None:
                        failed = QuantdError(grpc.StatusCode[reply[1]], reply[2])
        except BaseException:
            self.close(wait=0)  # the others may be in calls still: killed
            raise
        if failed is not None:
            raise failed
        return found

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        for _ in range(self.n):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(theirs, self.settings), name="quantd-stream", daemon=True)
            process.start()
            theirs.close()  # the worker's end lives only in the worker: its death reads as EOF here
            self.workers.append((process, ours))
        taken: set = set()  # one worker a server process, as far as there are enough of them
        for worker in self.workers:
            taken.add(self._run([Claim(frozenset(taken))], [worker])[0])

    def close(self, wait: float = 10) -> None:
        """End the workers (their pipe closes: each exits, killed if it has not within `wait` seconds) and free the
        staging memory."""
        for _, conn in self.workers:
            conn.close()
        for process, _ in self.workers:
            process.join(wait)
            if process.is_alive():
                process.kill()
                process.join()
        self.workers = []
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        for target in self.targets:
            target.memory.close()  # results keep their own mappings
        self.targets = []


def serve(conn, settings: dict) -> None:
    """A worker: run the Jobs and Claims that arrive on `conn` until it closes; reply ("ok", amax or instance) or
    ("error", code, details)."""
    # a connection of its own: a new client must not share the last one's (gRPC pools them per process)
    settings = {**settings, "options": [*settings.get("options", []), ("grpc.use_local_subchannel_pool", 1)]}
    client = QuantdClient(**settings)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the client closed, or its process died
                return
            try:
                if isinstance(message, Claim):
                    client, instance = claim(client, settings, message)
                    reply = ("ok", instance)
                else:
                    reply = ("ok", run(client, message))
            except QuantdError as exc:
                reply = ("error", exc.code.name, exc.details)
            except Exception as exc:  # noqa: BLE001 - the client hears of it, as a status
                reply = ("error", "INTERNAL", f"streams worker: {type(exc).__name__}: {exc}")
            try:
                conn.send(reply)
            except OSError:
                return
    finally:
        client.close()


def claim(client, settings: dict, message: Claim) -> tuple:
    """(client, the server instance it is connected to), reconnecting while that instance is taken."""
    for _ in range(message.tries):
        instance = client.server_info()["instance"]
        if instance not in message.taken or not instance:  # "": a server too old to say
            break
        client.close()
        client = QuantdClient(**settings)
    return client, instance


def run(client, job: Job):
    """Quantize a Job's piece with `client`, its outputs written into the output memory file; the amax."""
    source, target = mapped(*job.source), mapped(*job.target)
    x = source[job.start:job.start + nbytes((job.shape, job.dtype))].view(job.dtype).view(job.shape)

    def into(info):
        offset, size = job.outputs.get(info.name, (0, -1))
        if wire.info_nbytes(info) != size:
            raise ValueError(f"the server sent {info.name!r} of {wire.info_nbytes(info)} bytes, expected {size}")
        return target[offset:offset + size]
    scales = None if job.scales is None else torch.from_numpy(job.scales)
    return client._quantize_into(x, job.spec, into, scales=scales, amax=job.amax, timeout=job.timeout)


MAPPED: collections.OrderedDict = collections.OrderedDict()  # a worker's last mappings: (path, size) -> (inode, bytes)


def mapped(path: str, size: int) -> torch.Tensor:
    """The bytes of another process's memory file (/proc/<pid>/fd/<fd>), mapped here. The last few stay mapped
    (their pages in place for the next call) while the path still names the same file."""
    inode = os.stat(path).st_ino
    key = (path, size)
    if key in MAPPED and MAPPED[key][0] == inode:
        MAPPED.move_to_end(key)
        return MAPPED[key][1]
    with open(path, "r+b") as file:
        MAPPED[key] = (inode, shared.exported(mmap.mmap(file.fileno(), size)))
    while len(MAPPED) > 4:
        MAPPED.popitem(last=False)
    return MAPPED[key][1]


def nbytes(entry) -> int:
    """Bytes of a (shape, dtype) pair, as QuantSpec.storage gives them."""
    shape, dtype = entry
    return math.prod(shape) * dtype.itemsize
