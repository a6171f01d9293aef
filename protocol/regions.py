"""Shared-memory regions as both sides see them: names, the same-host nonce, and where tensors sit in a region.

A region is memory the client creates and the server maps: a memory file of the client process sealed against
shrinking (opened by the server as /proc/<pid>/fd/<fd>), or a POSIX shared-memory object (/dev/shm/<name>). The
client proves it shares the server's host by writing NONCE_BYTES random bytes at the start of the region before
registering it; the server compares them with the nonce in the request.
"""
from __future__ import annotations

import re

import numpy
import torch

from quantd.v1 import quantd_pb2 as pb

NONCE_BYTES = 32
ALIGN = 64  # tensors in a region start on cache-line boundaries
SHM_DIR = "/dev/shm"
# CUDA IPC storages a session keeps open (CudaIpcTensor.keep), the least recently used dropped first; the client
# mirrors the server's choice to know which it may name again as `kept`
KEPT_STORAGES = 8
NOT_KEPT = "is not kept open"  # in the FAILED_PRECONDITION of a `kept` storage the server no longer holds
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def check_name(name: str) -> str:
    """`name` if it is a plain shm object name (no slash, no '..'); ValueError otherwise."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"region name {name!r} is not a shared-memory object name ([A-Za-z0-9_.-], no '/')")
    return name


def layout(sizes, start: int = 0) -> tuple:
    """(offsets, end) placing tensors of `sizes` bytes one after the other from `start`, each ALIGN-aligned."""
    offsets, at = [], start
    for size in sizes:
        at = -(-at // ALIGN) * ALIGN
        offsets.append(at)
        at += size
    return offsets, at


def refs(region: str, offsets, sizes) -> list:
    return [pb.RegionRef(region=region, offset=o, size=s) for o, s in zip(offsets, sizes)]


def exported(buf) -> torch.Tensor:
    """A uint8 tensor over a mapping, through numpy, which holds an export of it for as long as any view lives
    (torch.frombuffer does not): the mapping then cannot be closed under a tensor still in use."""
    return torch.from_numpy(numpy.frombuffer(buf, dtype=numpy.uint8))
