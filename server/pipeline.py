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
