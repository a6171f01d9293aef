"""Tensors in a client's GPU memory, opened from their CUDA IPC handles (torch.multiprocessing's own sharing).

Only a client that proved it shares this host (its session holds a registered shared-memory region) and whose
tensors are on this server's GPU (same device UUID) may pass them. Opened storages are cached by torch per handle
and released when the last view of them goes.
"""
from __future__ import annotations

import grpc
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from quantd.protocol import wire

from .errors import ServiceError, invalid
from .regions import RegionTable, check_overlaps


def device_uuid(device: torch.device) -> str:
    """The CUDA device's UUID as nvidia-smi prints it ("GPU-..."), or "" for the CPU."""
    if device.type != "cuda":
        return ""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def open_tensors(msg, input_infos, output_infos, device: torch.device, regions: RegionTable):
    """(input tensors, output byte views) of a request's CudaTensors `msg`, on this server's GPU."""
    if device.type != "cuda":
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "CUDA IPC: this server computes on the CPU")
    if not regions.status(msg.session):
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "CUDA IPC needs a session holding a registered "
                           "shared-memory region: that proves the client is on this host")
    if msg.device_uuid != device_uuid(device):
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"CUDA IPC: the tensors are on {msg.device_uuid}, "
                           f"this server computes on {device_uuid(device)}")
    if len(msg.inputs) != len(input_infos) or len(msg.outputs) != len(output_infos):
        raise invalid(f"cuda: {len(input_infos)} input(s) and {len(output_infos)} output(s) expected, "
                      f"got {len(msg.inputs)} and {len(msg.outputs)}")
    shared = list(msg.inputs) + list(msg.outputs)
    infos = list(input_infos) + list(output_infos)
    spans = []
    for t, info in zip(shared, infos):
        nbytes = wire.info_nbytes(info)
        if t.offset_bytes < 0 or t.offset_bytes + nbytes > t.storage_bytes:
            raise invalid(f"cuda: tensor {info.name!r} ({nbytes} bytes at {t.offset_bytes}) out of bounds of its "
                          f"{t.storage_bytes}-byte storage")
        # the whole handle names the allocation: handles of different allocations can share a long prefix
        spans.append((f"cuda: allocation {t.handle.hex()}", t.storage_offset_bytes + t.offset_bytes, nbytes))
    check_overlaps(spans, len(msg.inputs))
    views = [_open(t, nbytes, device) for t, (_, _, nbytes) in zip(shared, spans)]
    inputs = [wire.tensor_from_buffer(v, info) for v, info in zip(views, input_infos)]
    return inputs, views[len(inputs):]


def _open(t, nbytes: int, device: torch.device) -> torch.Tensor:
    try:
        return rebuild_cuda_tensor(torch.Tensor, (nbytes,), (1,), t.offset_bytes, torch.UntypedStorage, torch.uint8,
                                   device.index or 0, t.handle, t.storage_bytes, t.storage_offset_bytes, False,
                                   t.ref_counter_handle, t.ref_counter_offset, t.event_handle, t.event_sync_required)
    except RuntimeError as exc:
        raise invalid(f"cuda: cannot open the CUDA IPC handle: {exc}") from None
