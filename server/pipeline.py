"""The input tensor where the kernels read it; which pieces of it are independent is quantd.protocol.pieces."""
from __future__ import annotations

import torch

from quantd.protocol.pieces import Piece


class DeviceInput:
    """The input tensor where the kernels read it: the staging buffer itself on CPU, a device copy on a GPU.

    stage(buffer) hands it the staging buffer, from the event loop, before the first piece is read."""

    def __init__(self, dtype: torch.dtype, shape: tuple, device: torch.device):
        self.dtype = dtype
        self.shape = tuple(shape)
        self.device = device
        self.host = self.flat = None

    def stage(self, staging: torch.Tensor) -> None:
        if self.host is None:
            self.host = staging.view(self.dtype)
            on_cpu = self.device.type == "cpu"
            self.flat = self.host if on_cpu else torch.empty(self.host.numel(), dtype=self.dtype, device=self.device)

    def piece(self, piece: Piece) -> torch.Tensor:
        """The elements of `piece` on the device (copied there first when it is a GPU), shaped for quantizing."""
        if self.device.type != "cpu":
            self.flat[piece.start:piece.end].copy_(self.host[piece.start:piece.end], non_blocking=True)
        return self.flat[piece.start:piece.end].view(piece.shape)

    def whole(self) -> torch.Tensor:
        return self.flat.view(self.shape)


def quantize_host_pieces(host: torch.Tensor, outputs: list, pieces: list, device: torch.device, quantize) -> list:
    """Quantize a tensor in host memory on a GPU piece by piece, each piece's copy in, quantize and copy out
    overlapping its neighbours' (a copy stream each way beside the compute stream), the pieces' results landing
    one after the other in `outputs` (host byte views, one per stored tensor): the layout join_pieces makes.

    quantize(i, piece i on the device) -> (its stored tensors, its amax or None); returns the amaxes, in order."""
    flat = host.reshape(-1)
    staged = torch.empty(flat.numel(), dtype=flat.dtype, device=device)
    compute = torch.cuda.current_stream(device)
    copy_in, copy_out = torch.cuda.Stream(device), torch.cuda.Stream(device)
    written, amaxes = [0] * len(outputs), []
    for i, piece in enumerate(pieces):
        with torch.cuda.stream(copy_in):
            staged[piece.start:piece.end].copy_(flat[piece.start:piece.end], non_blocking=True)
        compute.wait_stream(copy_in)
        tensors, amax = quantize(i, staged[piece.start:piece.end].view(piece.shape))
        amaxes.append(amax)
        copy_out.wait_stream(compute)
        with torch.cuda.stream(copy_out):
            for k, t in enumerate(tensors):
                b = t.reshape(-1).view(torch.uint8)
                outputs[k][written[k]:written[k] + b.numel()].copy_(b, non_blocking=True)
                b.record_stream(copy_out)  # freed by the compute stream's allocator only once copied
                written[k] += b.numel()
    copy_out.synchronize()
    if written != [o.numel() for o in outputs]:
        raise RuntimeError(f"the pieces' results fill {written} bytes of outputs of {[o.numel() for o in outputs]}")
    return amaxes
