"""Shared-memory regions registered by clients on this host, and the sessions that own them.

A session lives as long as its OpenSession call: when the call ends (the client closed it, cancelled it, or its
connection dropped because it died) every region it registered is released. A region is mapped once, at
registration, after the nonce check; it is pinned for the GPU (cudaHostRegister) when the server computes on one,
so copies from it run at host-to-device speed. Every use checks the session, the bounds, overlaps between inputs
and outputs, and that the shared-memory object is still there.
"""
from __future__ import annotations

import contextlib
import fcntl
import hmac
import mmap
import os
import secrets
import stat

import grpc
import torch

from quantd.protocol import regions as shared
from quantd.protocol import wire

from .errors import ServiceError, invalid

MAX_REGIONS_PER_SESSION = 256


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def denied(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, message)


class Region:
    """One mapped memory file. `users` counts calls using it; it is unmapped when released and unused.

    `memfd` (pid, fd): a memory file of the client process, opened through /proc; it must be sealed against
    shrinking, so its pages stay for as long as the server maps it. `name`: a POSIX shared-memory object in
    /dev/shm, which the client can shrink at any time (a fault in the server if it happens during a copy):
    taken only when `allow_unsealed`, and checked before and after each use."""

    def __init__(self, region_id: str, session: str, size: int, *, name: str = "", memfd=None,
                 allow_unsealed: bool = False):
        self.id, self.session, self.size = region_id, session, size
        if memfd is not None:
            self.name, self.path = f"memfd:{memfd.pid}/{memfd.fd}", f"/proc/{memfd.pid}/fd/{memfd.fd}"
        else:
            self.name, self.path = shared.check_name(name), os.path.join(shared.SHM_DIR, name)
        self.fd = _open_memory(self.path, self.name, follow=memfd is not None)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise invalid(f"{self.name!r} is not a shared-memory object")
            if st.st_size < size:
                raise invalid(f"region {self.name!r} is {st.st_size} bytes, smaller than the {size} registered")
            self.sealed = _sealed_against_shrinking(self.fd)
            if not (self.sealed or allow_unsealed):
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"region {self.name!r} is not sealed against shrinking (its client could take its "
                                   f"pages away while the server copies): register a memory file sealed with "
                                   f"F_SEAL_SHRINK (quantd's client does), or serve with --shm-unsealed allow")
            self.inode = st.st_ino
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.buffer = shared.exported(self.map)  # a call still computing keeps the mapping past release
        self.users = 0
        self.released = False
        self.pinned = False

    def pin(self) -> None:
        """Page-lock the region for the GPU (cudaHostRegister), so copies from and to it run at DMA speed."""
        # cudaHostRegisterPortable: pinned for every GPU of the process (a server may compute on several)
        self.pinned = int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.size, 1)) == 0

    def proves(self, nonce: bytes) -> bool:
        return hmac.compare_digest(bytes(self.map[:shared.NONCE_BYTES]), nonce)

    def check_present(self) -> None:
        """NOT_FOUND once a named object was removed (or replaced) or shrank below the registered size: writing
        into an object that shrank would fault. A sealed memory file cannot shrink, and stays while mapped."""
        if self.sealed:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_ino != self.inode:
            raise not_found(f"region {self.id}: its shared-memory object {self.name!r} vanished")
        if os.fstat(self.fd).st_size < self.size:
            raise not_found(f"region {self.id}: its shared-memory object {self.name!r} shrank below {self.size} bytes")

    def view(self, offset: int, size: int) -> torch.Tensor:
        return self.buffer[offset:offset + size]

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
        self.buffer = None
        try:
            self.map.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes when it is collected
            pass
        os.close(self.fd)


def _open_memory(path: str, name: str, *, follow: bool) -> int:
    """A read-write descriptor of the regular file at `path`; `follow` for a /proc/<pid>/fd link. Anything but a
    regular file (a device, a FIFO) is refused before it is opened."""
    try:
        if follow and not stat.S_ISREG(os.stat(path).st_mode):
            raise invalid(f"{name!r} is not a memory file")
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError:
        raise not_found(f"no shared memory {name!r} on the server's host (is the client on this host, sharing "
                        f"its /dev/shm, or, for a memory file, its process namespace?)") from None
    except OSError as exc:
        raise denied(f"cannot open shared memory {name!r}: {exc.strerror}") from None


def _sealed_against_shrinking(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # a file that takes no seals
        return False


class RegionTable:
    """Sessions and their regions; used from the event loop thread only."""

    def __init__(self, pin: bool, allow_unsealed: bool = False):
        self.pin = pin
        self.allow_unsealed = allow_unsealed
        self.sessions: dict = {}   # session id -> set of region ids
        self.regions: dict = {}    # region id -> Region
        self.kept: dict = {}       # session -> cuda_ipc.Kept: the CUDA IPC storages its client asked to keep open

    def open_session(self) -> str:
        session = secrets.token_hex(16)
        self.sessions[session] = set()
        return session

    def close_session(self, session: str, *, must_be_open: bool = False) -> None:
        """Release a session's regions and kept CUDA storages; must_be_open: NOT_FOUND for a session that is not
        (CloseSession; the end of its OpenSession call closes it again, a no-op)."""
        if must_be_open:
            self._session(session)
        kept = self.kept.pop(session, None)
        if kept is not None:
            kept.clear()
        for region_id in list(self.sessions.pop(session, ())):
            self._release(region_id)

    def _session(self, session: str) -> set:
        if session not in self.sessions:
            raise not_found("unknown session (it ended, or was never opened on this server): open a new one")
        return self.sessions[session]

    def register(self, session: str, size: int, nonce: bytes, *, name: str = "", memfd=None) -> Region:
        owned = self._session(session)
        if len(nonce) != shared.NONCE_BYTES:
            raise invalid(f"RegisterRegion: nonce must be {shared.NONCE_BYTES} bytes, got {len(nonce)}")
        if size < shared.NONCE_BYTES:
            raise invalid(f"RegisterRegion: size {size} is smaller than the {shared.NONCE_BYTES}-byte nonce")
        if len(owned) >= MAX_REGIONS_PER_SESSION:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a session holds at most {MAX_REGIONS_PER_SESSION} regions")
        region = Region(secrets.token_hex(8), session, size, name=name, memfd=memfd,
                        allow_unsealed=self.allow_unsealed)
        if not region.proves(nonce):
            region.close()
            raise denied(f"region {region.name!r} does not hold the request's nonce: the client must write it into the "
                         f"region, on the server's host, before registering")
        if self.pin:
            region.pin()
        owned.add(region.id)
        self.regions[region.id] = region
        return region

    def _owned(self, session: str, region_id: str) -> Region:
        self._session(session)
        region = self.regions.get(region_id)
        if region is None:
            raise not_found(f"unknown region {region_id!r} (never registered, or released)")
        if not hmac.compare_digest(region.session, session):
            raise denied(f"region {region_id!r} belongs to another session")
        return region

    def unregister(self, session: str, region_id: str) -> None:
        self._owned(session, region_id)
        self.sessions[session].discard(region_id)
        self._release(region_id)

    def _release(self, region_id: str) -> None:
        region = self.regions.pop(region_id)
        region.released = True
        if region.users == 0:
            region.close()

    def proves_host(self, session: str) -> bool:
        """Whether `session` is open and holds a registered region, which proves its client shares this host."""
        return bool(self.sessions.get(session))

    def status(self, session: str) -> list:
        return [self.regions[r] for r in sorted(self._session(session))]

    @contextlib.contextmanager
    def use(self, msg, input_infos, output_infos):
        """(input tensors, output byte views) of a request's RegionTensors `msg`, after checking it against the
        tensors the request declares; the regions stay mapped until the block ends."""
        if len(msg.inputs) != len(input_infos) or len(msg.outputs) != len(output_infos):
            raise invalid(f"regions: {len(input_infos)} input(s) and {len(output_infos)} output(s) expected, "
                          f"got {len(msg.inputs)} and {len(msg.outputs)}")
        refs = list(msg.inputs) + list(msg.outputs)
        infos = list(input_infos) + list(output_infos)
        regions = [self._owned(msg.session, ref.region) for ref in refs]
        for ref, info, region in zip(refs, infos, regions):
            _check_ref(ref, info, region)
        check_overlaps([(f"region {ref.region}", ref.offset, ref.size) for ref in refs], len(msg.inputs))
        for region in set(regions):
            region.check_present()
            region.users += 1
        try:
            views = [region.view(ref.offset, ref.size) for ref, region in zip(refs, regions)]
            inputs = [wire.tensor_from_buffer(v, info) for v, info in zip(views, input_infos)]
            yield inputs, views[len(input_infos):]
            for region in set(regions):
                region.check_present()
        finally:
            for region in set(regions):
                region.users -= 1
                if region.released and region.users == 0:
                    region.close()


def _check_ref(ref, info, region: Region) -> None:
    nbytes = wire.info_nbytes(info)
    itemsize = wire.dtype_from_name(info.dtype).itemsize
    where = f"region {ref.region}: tensor {info.name!r}"
    if ref.size != nbytes:
        raise invalid(f"{where} is {nbytes} bytes, the reference gives {ref.size}")
    if ref.offset < 0 or ref.offset + ref.size > region.size:
        raise invalid(f"{where}: bytes [{ref.offset}, {ref.offset + ref.size}) out of bounds of the "
                      f"{region.size}-byte region")
    if ref.offset % itemsize:
        raise invalid(f"{where}: offset {ref.offset} is not a multiple of its element size {itemsize}")


def check_overlaps(spans, n_inputs: int) -> None:
    """INVALID_ARGUMENT when an output overlaps an input or another output (inputs may share bytes).
    spans: (memory, offset, size) of the inputs, then of the outputs."""
    for i, (memory, offset, size) in enumerate(spans[n_inputs:], n_inputs):
        for j, (other, other_offset, other_size) in enumerate(spans[:i]):
            if other == memory and size and other_size and offset < other_offset + other_size and \
                    other_offset < offset + size:
                kind = "input" if j < n_inputs else "output"
                raise invalid(f"{memory}: output {i - n_inputs} overlaps {kind} {j if j < n_inputs else j - n_inputs}")
