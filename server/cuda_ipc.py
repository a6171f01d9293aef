"""Tensors in a client's GPU memory, opened from their CUDA IPC handles (torch.multiprocessing's own sharing).

Only a client that proved it shares this host (its session holds a registered shared-memory region) may pass them,
and only on a GPU this server's process sees. A tensor on a GPU the call does not compute on crosses GPUs
(Crossing): by device-to-device copies when the two GPUs can access each other's memory (peer access, NVLink or
PCIe), else through host memory. Opened storages are cached by torch per handle and released when the last view
of them goes; a session keeps those its client asked to keep (Kept), so that later calls skip opening them.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging

import grpc
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from quantd.protocol import regions as shared
from quantd.protocol import wire

from . import replay
from .errors import ServiceError, invalid
from .regions import RegionTable, check_overlaps

log = logging.getLogger("quantd.server")


def device_uuid(device: torch.device) -> str:
    """The CUDA device's UUID as nvidia-smi prints it ("GPU-..."), or "" for the CPU."""
    if device.type != "cuda":
        return ""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


@functools.lru_cache(maxsize=None)
def _visible() -> tuple:
    return tuple(device_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))


def visible_gpus(device: torch.device) -> list:
    """UUIDs of the GPUs this process sees, by index: those whose IPC handles it can open (none on a CPU server)."""
    return list(_visible()) if device.type == "cuda" else []


class Kept:
    """The storages a session keeps open for its client (CudaIpcTensor.keep), by (handle, storage offset), the most
    recently used last. A later call names one as `kept` and uses it without opening anything; a storage shared
    again is answered from torch's cache of open handles while it is kept. Bounded (KEPT_STORAGES): each kept
    storage keeps the client's allocation reserved. The session's replay plans (server.replay) use these
    storages: any storage let go drops them all."""

    def __init__(self):
        self.storages: collections.OrderedDict = collections.OrderedDict()
        self.plans = replay.Plans()

    def release(self, tensors) -> None:
        for t in tensors:
            if self.storages.pop((t.handle, t.storage_offset_bytes), None) is not None:
                self.plans.clear()

    def touch(self, keys) -> None:
        """A replayed call used these storages: the most recently used, as the client counts them too."""
        for key in keys:
            self.storages.move_to_end(key)

    def get(self, t) -> torch.UntypedStorage:
        storage = self.storages.get((t.handle, t.storage_offset_bytes))
        if storage is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"cuda: the storage at {t.storage_offset_bytes} of allocation {t.handle.hex()} "
                               f"{shared.NOT_KEPT} in this session: share it again")
        return storage

    def check(self, tensors) -> None:
        """FAILED_PRECONDITION (get's) unless each `kept` tensor of a request names a storage kept now, or one an
        earlier tensor of the request shares with `keep` (opened and kept first: an output's codes and scales
        in one result buffer)."""
        shared_here = set()
        for t in tensors:
            key = (t.handle, t.storage_offset_bytes)
            if t.kept and key not in shared_here:
                self.get(t)
            if t.keep:
                shared_here.add(key)

    def clear(self) -> None:
        """Let go of every storage (the session ended): done here rather than left to this object's collection,
        which a traceback still holding it could put off."""
        self.plans.clear()
        self.storages.clear()

    def keep(self, t, view: torch.Tensor) -> None:
        key = (t.handle, t.storage_offset_bytes)
        self.storages[key] = view.untyped_storage()
        self.storages.move_to_end(key)
        while len(self.storages) > shared.KEPT_STORAGES:
            self.storages.popitem(last=False)
            self.plans.clear()


def open_tensors(msg, input_infos, output_infos, device: torch.device, regions: RegionTable):
    """(input tensors, output byte views) of a request's CudaTensors `msg`, on the GPU they are on; storages the
    request marks `keep` stay open in the session's Kept, those it lists in `release` are let go first. A request
    refused after its session proved the same host releases the reference counters of the shares it did not open
    (_release_counters)."""
    if device.type != "cuda":
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "CUDA IPC: this server computes on the CPU")
    if not regions.status(msg.session):
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "CUDA IPC needs a session holding a registered "
                           "shared-memory region: that proves the client is on this host")
    taken = _refusal.get()
    if taken is not None:  # the shares' counters are this function's to release from here on
        taken.append(True)
    tensors = list(msg.inputs) + list(msg.outputs)
    views = []
    try:
        _open_all(msg, tensors, input_infos, output_infos, device, regions, views)
    except Exception:
        _release_counters(tensors[len(views):])
        raise
    return ([wire.tensor_from_buffer(v, info) for v, info in zip(views, input_infos)], views[len(input_infos):])


def _open_all(msg, tensors, input_infos, output_infos, device, regions, views: list) -> None:
    """Check a request's tensors, then open them into `views`, in order (kept as opened: a later tensor of the
    request may name an earlier one `kept`)."""
    visible = visible_gpus(device)
    if msg.device_uuid not in visible:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"CUDA IPC: the tensors are on {msg.device_uuid}, "
                           f"a GPU this server does not see (it sees {', '.join(visible)})")
    if len(msg.inputs) != len(input_infos) or len(msg.outputs) != len(output_infos):
        raise invalid(f"cuda: {len(input_infos)} input(s) and {len(output_infos)} output(s) expected, "
                      f"got {len(msg.inputs)} and {len(msg.outputs)}")
    infos = list(input_infos) + list(output_infos)
    spans = []
    for t, info in zip(tensors, infos):
        nbytes = wire.info_nbytes(info)
        if t.offset_bytes < 0 or t.offset_bytes + nbytes > t.storage_bytes:
            raise invalid(f"cuda: tensor {info.name!r} ({nbytes} bytes at {t.offset_bytes}) out of bounds of its "
                          f"{t.storage_bytes}-byte storage")
        # the whole handle names the allocation: handles of different allocations can share a long prefix
        spans.append((f"cuda: allocation {t.handle.hex()}", t.storage_offset_bytes + t.offset_bytes, nbytes))
    check_overlaps(spans, len(msg.inputs))
    index = visible.index(msg.device_uuid)
    kept = regions.kept.setdefault(msg.session, Kept())
    kept.release(msg.release)
    kept.check(tensors)  # before any handle is opened
    for t, (_, _, nbytes) in zip(tensors, spans):
        views.append(_open(t, nbytes, index, kept))
        _check_size(t, views[-1])
        if t.keep or t.kept:
            kept.keep(t, views[-1])


# Set while a request with CUDA IPC tensors is served (released_if_refused): open_tensors marks it when it takes
# the request's shares
_refusal: contextvars.ContextVar = contextvars.ContextVar("quantd_cuda_ipc_refusal", default=None)


@contextlib.contextmanager
def released_if_refused(msg, regions: RegionTable):
    """Around serving a request whose tensors are CudaTensors `msg`: if it fails before open_tensors took them
    (admission, a bad spec), the reference counters of its shares are released, as open_tensors does for the
    shares it did not open, once the session proved the same host."""
    taken: list = []
    token = _refusal.set(taken)
    try:
        yield
    except BaseException:
        if not taken and torch.cuda.is_available() and regions.proves_host(msg.session):
            _release_counters((*msg.inputs, *msg.outputs))
        raise
    finally:
        _refusal.reset(token)


def _release_counters(tensors) -> None:
    """Release the reference counters of shared tensors a refused request did not open. Each share counts the
    server as a user of the client's storage until the server's copy of it goes; one never opened would keep the
    client's memory from being freed for the life of its process."""
    for t in tensors:
        if not t.kept and t.ref_counter_handle:
            try:
                torch.UntypedStorage._release_ipc_counter_cuda(t.ref_counter_handle, t.ref_counter_offset)
            except RuntimeError as exc:  # the client's counter file is gone: nothing to release
                log.debug("CUDA IPC: cannot release a reference counter: %s", exc)


def _open(t, nbytes: int, index: int, kept: Kept) -> torch.Tensor:
    if t.kept:
        storage = kept.get(t)
        view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, t.offset_bytes, (nbytes,), (1,))
    else:
        view = _rebuild(t, nbytes, index)
    return view


def _check_size(t, view: torch.Tensor) -> None:
    """torch answers a handle it holds open from its cache, whatever size the request claims for it."""
    if view.untyped_storage().nbytes() != t.storage_bytes:
        raise invalid(f"cuda: the storage at {t.storage_offset_bytes} of allocation {t.handle.hex()} is "
                      f"{view.untyped_storage().nbytes()} bytes, not the {t.storage_bytes} the request says")


def _rebuild(t, nbytes: int, index: int) -> torch.Tensor:
    try:
        return rebuild_cuda_tensor(torch.Tensor, (nbytes,), (1,), t.offset_bytes, torch.UntypedStorage, torch.uint8,
                                   index, t.handle, t.storage_bytes, t.storage_offset_bytes, False,
                                   t.ref_counter_handle, t.ref_counter_offset, t.event_handle, t.event_sync_required)
    except RuntimeError as exc:
        raise invalid(f"cuda: cannot open the CUDA IPC handle: {exc}") from None


class Crossing:
    """How a call's inputs reach the device it computes on, and its outputs get back to where the client wants them.

    how: "local" (the same device, or host memory: plain copies), "peer" (two GPUs that can access each other's
    memory: device-to-device copies, which torch makes peer to peer), "staged" (two GPUs without peer access:
    through host memory). `reason` says so for the two cross-GPU cases ("" otherwise)."""

    _warned: set = set()

    def __init__(self, source: torch.device, compute: torch.device):
        self.source, self.compute = source, compute
        self.how, self.reason = "local", ""
        if source.type == "cuda" and compute.type == "cuda" and source != compute:
            peer = (torch.cuda.can_device_access_peer(compute, source)
                    and torch.cuda.can_device_access_peer(source, compute))
            self.how = "peer" if peer else "staged"
            self.reason = (f"CUDA IPC tensors on {source} ({device_uuid(source)}), computed on {compute}: "
                           + ("read and written through peer access" if peer else
                              "no peer access between the two GPUs, copied through host memory"))

    def log(self) -> None:
        if self.how == "staged" and (self.source, self.compute) not in self._warned:
            self._warned.add((self.source, self.compute))
            log.warning("%s", self.reason)
        else:
            log.debug("%s", self.reason)

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        if self.how == "staged":
            return t.cpu().to(self.compute)
        return t.to(self.compute, non_blocking=True)

    def write(self, view: torch.Tensor, result: torch.Tensor) -> None:
        view.copy_(result.cpu() if self.how == "staged" else result)

    def finish(self) -> None:
        """Wait for the writes to the source GPU (the caller waits for the compute device's work itself)."""
        if self.how != "local":
            torch.cuda.current_stream(self.source).synchronize()
