"""How a call's tensors reach the server: streamed chunks ("grpc"), GPU memory shared by CUDA IPC ("ipc"), shared
memory on the server's host ("shm"), or one tensor split over parallel streams on separate connections ("streams").

The client picks one per call (transport="auto") and says which and why in QuantdClient.last_transport:
- ipc for CUDA tensors on a GPU the server sees, once shm proved the server shares this host: the server opens the
  tensors' CUDA IPC handles (torch.multiprocessing.reductions) and writes the outputs into buffers the client
  allocated on the same GPU (computing on that GPU when it is one of the server's, else crossing GPUs: peer access
  where the GPUs allow it, else a copy through host memory; QuantdClient.last_placement says which).
- shm when the server proves to share this host: the client creates a memory file sealed against shrinking
  (memfd; a POSIX shared-memory object where the server cannot open that and takes unsealed regions), writes a
  random nonce into it and registers it; a server on another host cannot open it, or finds other bytes.
  Inputs are copied into the region (no copy for a tensor from QuantdClient.shm_tensor), the server writes the
  outputs into a result region whose mapping the returned tensors keep (or into the scratch region, copied out,
  when every result region is held by live results), and only the header and summary cross gRPC, or the
  server's local socket where it has one (quantd.client.local: no gRPC round trip; Choice.via says which).
- streams for a Quantize whose pieces are independent (quantd.protocol.pieces) when parallel_streams > 1: each piece
  on a connection of its own, sent by a worker process (quantd.client.streams).
- grpc otherwise.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import mmap
import os
import secrets
import threading
from multiprocessing import shared_memory

import grpc
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from quantd.protocol import regions as shared
from quantd.protocol import wire
from quantd.v1 import quantd_pb2 as pb

TRANSPORTS = ("auto", "grpc", "ipc", "shm", "streams")
MIN_REGION_BYTES = 1 << 20
CLOSE_SECONDS = 5.0  # how long close() waits for the server to end a session before it lets the session's call go


@dataclasses.dataclass(frozen=True)
class Choice:
    transport: str   # grpc | ipc | shm | streams
    reason: str
    via: str = "grpc"  # how an ipc or shm call's header went: "grpc", or "local socket" (quantd.client.local)


def close_mapping(close) -> bool:
    """Close a mapping unless tensors still view it (a shm_tensor or result kept past close()): then it is unmapped
    when the last of them goes. Whether it closed."""
    try:
        close()
    except BufferError:
        return False
    return True


class SealedMemory:
    """A memory file of this process (memfd) sealed against shrinking and growing, mapped here; the server opens it
    as /proc/<pid>/fd/<fd>. The seal is what lets a server map it: nothing can take its pages away."""

    def __init__(self, size: int):
        self.fd = os.memfd_create(f"quantd-{secrets.token_hex(4)}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.buf = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def path(self) -> str:
        """Where another process of this host and user opens it."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def register(self, stub, request):
        request.memfd.CopyFrom(pb.MemoryFile(pid=os.getpid(), fd=self.fd))
        return stub.RegisterRegion(request).region

    def close(self):
        close_mapping(self.buf.close)
        os.close(self.fd)


class NamedMemory:
    """A POSIX shared-memory object /dev/shm/quantd-<random>, for a server that cannot open this process's memory
    files (another process namespace) and takes unsealed regions."""

    def __init__(self, size: int):
        self.shm = shared_memory.SharedMemory(f"quantd-{secrets.token_hex(8)}", create=True, size=size)
        self.buf = self.shm.buf

    def register(self, stub, request):
        request.name = self.shm.name
        return stub.RegisterRegion(request).region

    def close(self):
        self.buf = None
        close_mapping(self.shm.close)
        self.shm.unlink()


# A server answers these when it cannot open this process's memory file (other namespace; an older server reads
# no memfd field and finds no name); the named object is tried next.
_TRY_NAMED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


class ShmRegion:
    """Memory this client created and registered with the server: a sealed memory file, or a named shared-memory
    object where the server cannot open the former. The first NONCE_BYTES hold a random nonce at registration."""

    def __init__(self, stub, session: str, size: int):
        self.size = size
        nonce = secrets.token_bytes(shared.NONCE_BYTES)
        kinds = [SealedMemory, NamedMemory] if hasattr(os, "memfd_create") else [NamedMemory]
        for i, kind in enumerate(kinds):
            self.memory = kind(size)
            self.buffer = shared.exported(self.memory.buf)
            self.buffer[:shared.NONCE_BYTES] = torch.frombuffer(bytearray(nonce), dtype=torch.uint8)
            request = pb.RegisterRegionRequest(session=session, size=size, nonce=nonce)
            try:
                self.id = self.memory.register(stub, request)
                return
            except BaseException as exc:
                self.free()
                if not (isinstance(exc, grpc.RpcError) and exc.code() in _TRY_NAMED and i + 1 < len(kinds)):
                    raise

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Byte offset of a contiguous CPU tensor lying inside this region, else None."""
        start = t.data_ptr() - self.buffer.data_ptr()
        inside = 0 <= start and start + t.numel() * t.element_size() <= self.size
        return start if t.device.type == "cpu" and t.is_contiguous() and inside else None

    def free(self) -> None:
        """Let go of this side's memory (the server's registration is another matter: close)."""
        self.buffer = None
        self.memory.close()

    def close(self, stub, session: str) -> None:
        try:
            stub.UnregisterRegion(pb.UnregisterRegionRequest(session=session, region=self.id))
        except grpc.RpcError:
            pass  # the session ended already: the server released the region with it
        self.free()


class HeldResults:
    """A memory file whose outputs the caller keeps without a copy: each call's results are views of a mapping of
    their own, and the memory serves another call only once no view of the last one is alive (its mapping then
    closes; Python refuses to close a mapping that tensors still export)."""

    def __init__(self, memory: SealedMemory, size: int):
        self.memory, self.size = memory, size
        self.mapping = None

    @property
    def free(self) -> bool:
        if self.mapping is not None:
            if not close_mapping(self.mapping.close):  # results of the last call are still referenced
                return False
            self.mapping = None
        return True

    def results(self) -> torch.Tensor:
        """The memory's bytes through a new mapping, which the returned tensor (and its views) keep alive."""
        self.mapping = mmap.mmap(self.memory.fd, self.size)
        return shared.exported(self.mapping)


class ResultRegion(HeldResults):
    """HeldResults in a region registered with the server, which writes the outputs there."""

    def __init__(self, stub, session: str, size: int):
        self.region = ShmRegion(stub, session, size)
        super().__init__(self.region.memory, self.region.size)


class ShmTransport:
    """One session on the server, a scratch region grown as needed (inputs that must be copied; outputs where no
    result region is free), result regions (outputs handed over without a copy) and the regions of shm_tensor()s."""

    # Result regions a transport keeps; with all of them held by live results, outputs are copied out of scratch.
    MAX_RESULT_REGIONS = 4

    def __init__(self, stub):
        self.stub = stub
        self.lock = threading.Lock()
        self.call = stub.OpenSession(pb.OpenSessionRequest())  # no deadline: the session lasts until close()
        try:
            self.session = next(self.call).session
            self.scratch = ShmRegion(stub, self.session, MIN_REGION_BYTES)
        except BaseException:
            self.call.cancel()
            raise
        self.user_regions: list = []
        self.result_regions: list = []

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor living in a registered region of its own: calls reference it without copying it."""
        nbytes = max(shared.NONCE_BYTES, int(torch.Size(shape).numel()) * dtype.itemsize)
        region = ShmRegion(self.stub, self.session, shared.layout([nbytes], shared.ALIGN)[1])
        self.user_regions.append(region)
        return region.buffer[shared.ALIGN:shared.ALIGN + nbytes].view(dtype)[:torch.Size(shape).numel()].view(shape)

    def _scratch(self, size: int) -> ShmRegion:
        if size > self.scratch.size:
            self.scratch.close(self.stub, self.session)
            self.scratch = ShmRegion(self.stub, self.session, max(size, 2 * self.scratch.size))
        return self.scratch

    def call_with(self, send, header, tensors, outputs):
        """Run send(header) with `tensors` and `outputs` (TensorInfos) placed in regions; (output tensors by name,
        Summary). The scratch region serves one call at a time; the outputs go to a free result region, which the
        returned tensors then hold, else to scratch, copied out after the call."""
        with self.lock:
            placed = [self._in_user_region(t) for t in tensors]
            copied = [t for t, p in zip(tensors, placed) if p is None]
            out_sizes = [wire.info_nbytes(i) for i in outputs]
            out_offsets, out_end = shared.layout(out_sizes, shared.ALIGN)
            result = self._result_region(out_end)
            sizes = [t.numel() * t.element_size() for t in copied] + ([] if result else out_sizes)
            offsets, end = shared.layout(sizes, shared.ALIGN)
            scratch = self._scratch(end)
            msg = pb.RegionTensors(session=self.session)
            at = iter(zip(offsets, sizes))
            for t, p in zip(tensors, placed):
                if p is None:
                    offset, size = next(at)
                    scratch.buffer[offset:offset + size].copy_(t.contiguous().reshape(-1).view(torch.uint8))
                    p = (scratch.id, offset, size)
                msg.inputs.append(pb.RegionRef(region=p[0], offset=p[1], size=p[2]))
            out_at = list(zip(out_offsets, out_sizes)) if result else list(at)
            out_region = result.region if result else scratch
            msg.outputs.extend(pb.RegionRef(region=out_region.id, offset=o, size=s) for o, s in out_at)
            header.regions.CopyFrom(msg)
            summary = send(header)
            if list(summary.bytes) != [s for _, s in out_at]:
                raise ValueError(f"the server wrote {list(summary.bytes)} bytes, expected {[s for _, s in out_at]}")
            if result:
                held = result.results()
                return {info.name: wire.tensor_from_buffer(held[o:o + s], info)
                        for info, (o, s) in zip(outputs, out_at)}, summary
            return {info.name: wire.tensor_from_buffer(scratch.buffer[o:o + s].clone(), info)
                    for info, (o, s) in zip(outputs, out_at)}, summary

    def _result_region(self, size: int) -> ResultRegion | None:
        """A free result region of at least `size` bytes (registered now if there is room for one more), or None:
        every region is held by live results, or the server cannot open memory files (named objects are copied)."""
        free = [r for r in self.result_regions if r.free]
        fitting = [r for r in free if r.region.size >= size]
        if fitting:
            return min(fitting, key=lambda r: r.region.size)
        if free and len(self.result_regions) >= self.MAX_RESULT_REGIONS:  # replace the smallest free one
            smallest = min(free, key=lambda r: r.region.size)
            smallest.region.close(self.stub, self.session)
            self.result_regions.remove(smallest)
        if len(self.result_regions) >= self.MAX_RESULT_REGIONS or not isinstance(self.scratch.memory, SealedMemory):
            return None
        region = ResultRegion(self.stub, self.session, max(size, MIN_REGION_BYTES))
        if not isinstance(region.region.memory, SealedMemory):
            region.region.close(self.stub, self.session)
            return None
        self.result_regions.append(region)
        return region

    def _in_user_region(self, t: torch.Tensor):
        for region in self.user_regions:
            offset = region.offset_of(t)
            if offset is not None:
                return region.id, offset, t.numel() * t.element_size()
        return None

    def status(self) -> pb.RegionStatusResponse:
        return self.stub.RegionStatus(pb.RegionStatusRequest(session=self.session))

    def close(self) -> None:
        """End the session: the server lets go of its regions and of the CUDA storages it keeps before this
        returns (a process that exits next leaves nothing shared behind), then the session's call ends."""
        regions = [self.scratch, *self.user_regions, *(r.region for r in self.result_regions)]
        try:
            self.stub.CloseSession(pb.CloseSessionRequest(session=self.session), timeout=CLOSE_SECONDS)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server before CloseSession: region by region
                for region in regions:
                    region.close(self.stub, self.session)
                regions = []
        for region in regions:
            region.free()  # results still alive keep their own mappings
        self.user_regions, self.result_regions = [], []
        self.call.cancel()


@dataclasses.dataclass
class SharedStorage:
    """A storage shared with `keep` in an earlier call: its description, and a weak reference that says whether
    the caller still holds it."""
    description: pb.CudaIpcTensor
    ref: StorageWeakRef


class IpcTransport:
    """CUDA tensors passed by their CUDA IPC handles, in the session of a ShmTransport (the same-host proof).

    A storage is shared once and kept open by the server (CudaIpcTensor.keep); later calls name it `kept`, so a call
    on tensors seen before opens nothing. `kept` mirrors the server's bounded choice (KEPT_STORAGES, least recently
    used dropped first); an input the caller has freed is released with the next call. Outputs go to one of up to
    MAX_BUFFERS result buffers and are handed over as views of it: a buffer serves again once no result of its
    last call lives (with all of them held, a call gets a buffer of its own)."""

    MAX_BUFFERS = 4

    def __init__(self, shm: ShmTransport):
        self.shm = shm
        self.lock = threading.Lock()
        self.kept: collections.OrderedDict = collections.OrderedDict()  # storage _cdata -> SharedStorage
        self.buffers: list = []   # result buffers (UntypedStorage)
        self.release: list = []   # descriptions of kept storages to release with the next call

    def call_with(self, send, header, tensors, outputs):
        """Like ShmTransport.call_with, for CUDA tensors; the outputs are written on the inputs' GPU."""
        device = tensors[0].device
        with self.lock:
            contiguous = [t.contiguous() for t in tensors]
            sizes = [wire.info_nbytes(info) for info in outputs]
            offsets, end = shared.layout(sizes)
            buffer, pooled = self._buffer(device, end)
            views = [torch.empty(0, dtype=torch.uint8, device=device).set_(buffer, o, (n,), (1,))
                     for o, n in zip(offsets, sizes)]
            torch.cuda.current_stream(device).synchronize()  # the inputs are written before the server reads them
            for retry in (False, True):
                self._forget_freed()
                msg = pb.CudaTensors(session=self.shm.session, device_uuid=device_uuid(device), release=self.release)
                # only the caller's own tensors and the result buffers are kept: a contiguous copy dies with the call
                msg.inputs.extend(self._describe(c, c is t) for c, t in zip(contiguous, tensors))
                msg.outputs.extend(self._describe(v, pooled) for v in views)
                header.cuda.CopyFrom(msg)
                try:
                    summary = send(header)
                    self.release = []
                    break
                except grpc.RpcError as exc:
                    self.kept.clear()  # the server's choice is unknown now: share everything again
                    if retry or exc.code() != grpc.StatusCode.FAILED_PRECONDITION or \
                            shared.NOT_KEPT not in (exc.details() or ""):
                        raise
        if list(summary.bytes) != sizes:
            raise ValueError(f"the server wrote {list(summary.bytes)} bytes, expected {sizes}")
        return {info.name: wire.tensor_from_buffer(v, info) for info, v in zip(outputs, views)}, summary

    def _describe(self, t: torch.Tensor, keep: bool) -> pb.CudaIpcTensor:
        """t's description: `kept` when the server holds its storage open, else shared now (with `keep`)."""
        storage = t.untyped_storage()
        seen = self.kept.get(storage._cdata) if keep else None
        if seen is None:
            description = ipc_tensor(t)
            description.keep = keep
        else:
            d = seen.description
            description = pb.CudaIpcTensor(handle=d.handle, storage_bytes=d.storage_bytes, kept=True,
                                           storage_offset_bytes=d.storage_offset_bytes,
                                           offset_bytes=t.storage_offset() * t.element_size())
        if keep:  # the server's bookkeeping, in the same order
            self.kept[storage._cdata] = SharedStorage(seen.description if seen else description,
                                                      StorageWeakRef(storage))
            self.kept.move_to_end(storage._cdata)
            while len(self.kept) > shared.KEPT_STORAGES:
                self.kept.popitem(last=False)
        return description

    def _forget_freed(self) -> None:
        """Release the kept storages the caller has freed (torch holds their memory until the server lets go)."""
        for key, seen in list(self.kept.items()):
            if seen.ref.expired():
                del self.kept[key]
                self.release.append(_named(seen.description))

    def _buffer(self, device: torch.device, size: int) -> tuple:
        """(a result buffer of at least `size` bytes on `device`, whether it is one of the kept ones)."""
        free = [b for b in self.buffers if b.device == device and torch._C._storage_Use_Count(b._cdata) == 1]
        fitting = [b for b in free if b.nbytes() >= size]
        if fitting:
            return min(fitting, key=lambda b: b.nbytes()), True
        if free and len(self.buffers) >= self.MAX_BUFFERS:  # replace the smallest free one
            smallest = min(free, key=lambda b: b.nbytes())
            self.buffers.remove(smallest)
            seen = self.kept.pop(smallest._cdata, None)
            if seen is not None:
                self.release.append(_named(seen.description))
        if len(self.buffers) >= self.MAX_BUFFERS:
            return torch.empty(size, dtype=torch.uint8, device=device).untyped_storage(), False
        self.buffers.append(torch.empty(max(size, MIN_REGION_BYTES), dtype=torch.uint8, device=device).untyped_storage())
        return self.buffers[-1], True

    def close(self) -> None:
        """Forget the kept storages (the server releases them when the session ends) and the result buffers."""
        self.kept.clear()
        self.buffers, self.release = [], []


def _named(d: pb.CudaIpcTensor) -> pb.CudaIpcTensor:
    return pb.CudaIpcTensor(handle=d.handle, storage_offset_bytes=d.storage_offset_bytes)


def ipc_tensor(t: torch.Tensor) -> pb.CudaIpcTensor:
    """The CUDA IPC description of a contiguous CUDA tensor, as torch.multiprocessing shares it."""
    from torch.multiprocessing.reductions import reduce_tensor
    (_, _, _, offset, _, _, _, handle, storage_bytes, storage_offset_bytes, _, ref_counter_handle, ref_counter_offset,
     event_handle, event_sync_required) = reduce_tensor(t)[1]
    return pb.CudaIpcTensor(handle=handle, storage_bytes=storage_bytes, storage_offset_bytes=storage_offset_bytes,
                            ref_counter_handle=ref_counter_handle, ref_counter_offset=ref_counter_offset,
                            event_handle=event_handle or b"", event_sync_required=event_sync_required,
                            offset_bytes=offset * t.element_size())


def device_uuid(device: torch.device) -> str:
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def check(transport: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    return transport


WHY = {"ipc": "the server sees the tensors' GPU", "shm": "the server shares this host",
       "streams": "a Quantize in independent pieces"}


def choose(asked: str, ipc_reason, shm_reason, streams_reason) -> Choice:
    """The transport for a call: `asked` if it works, else the next that does, with the reasons.

    ipc_reason() / shm_reason() / streams_reason(): None when that transport can serve the call, else why not."""
    if check(asked) == "grpc":
        return Choice("grpc", "asked for")
    reasons = []
    for name, why_not in (("ipc", ipc_reason), ("shm", shm_reason), ("streams", streams_reason)):
        if asked in ("auto", name):
            reason = why_not()
            if reason is None:
                return Choice(name, "asked for" if asked == name else WHY[name])
            reasons.append(f"{name}: {reason}")
    return Choice("grpc", "; ".join(reasons))
