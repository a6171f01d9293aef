"""Scale layouts: how the scale (and zero-point) tensors of a QuantizedTensor lie in memory.

Backends allocate their outputs through scale_tensor; the dispatcher moves the results of backends
that write only the row-major layout (with_scale_layout). Nothing here needs a backend or the dispatcher.
"""
from __future__ import annotations

import torch

from .spec import QuantizedTensor

SCALE_LAYOUTS = ("row", "col")


def scale_tensor(shape, dtype: torch.dtype, device, layout: str = "row") -> torch.Tensor:
    """An empty scale (or zero-point) tensor of logical `shape`; "col" makes the last dim the slowest."""
    if layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {', '.join(SCALE_LAYOUTS)}, got {layout!r}")
    shape = tuple(shape)
    if layout == "row" or len(shape) < 2:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty((shape[-1],) + shape[:-1], dtype=dtype, device=device).movedim(0, -1)


def with_scale_layout(qt: QuantizedTensor, layout: str) -> QuantizedTensor:
    """`qt` with its scales and zero points copied into `layout` (values unchanged)."""
    def moved(t):
        if t is None:
            return None
        out = scale_tensor(t.shape, t.dtype, t.device, layout)
        if t.element_size() == 1:  # float8_e8m0fnu has no copy kernel everywhere: copy the bytes
            out.view(torch.uint8).copy_(t.view(torch.uint8))
        else:
            out.copy_(t)
        return out
    if layout == "row":
        return qt
    return QuantizedTensor(qt.codes, moved(qt.scales), qt.spec, qt.shape, moved(qt.zero_points), qt.tensor_scale)


def check_out(out: QuantizedTensor, spec, shape, device) -> None:
    """ValueError unless `out` holds, for a tensor of `shape` quantized with `spec`, every stored tensor as
    spec.storage lays it out: its shape and dtype, contiguous (row-major scales), on `device`."""
    if out.spec != spec or tuple(out.shape) != tuple(shape):
        raise ValueError("quantize: out must be of the same spec and shape as the input")
    for name, tshape, dtype in spec.storage(shape).tensors():
        t = getattr(out, name)
        if t is None or tuple(t.shape) != tuple(tshape) or t.dtype != dtype or not t.is_contiguous() \
                or t.device != torch.device(device):
            raise ValueError(f"quantize: out.{name} must be a contiguous {dtype} tensor of shape {list(tshape)} on "
                             f"{device}")


def check_out_values(out: torch.Tensor, shape, dtype: torch.dtype, device) -> None:
    """ValueError unless `out` can hold dequantized values: contiguous, of `shape` and `dtype`, on `device`."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous() \
            or out.device != torch.device(device):
        raise ValueError(f"dequantize: out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}")


def copy_into(out: QuantizedTensor, qt: QuantizedTensor) -> QuantizedTensor:
    """`out` (check_out's) with the stored tensors of `qt` (row-major) copied into its own, byte for byte
    (float8_e8m0fnu has no copy kernel everywhere)."""
    check_out(out, qt.spec, qt.shape, qt.codes.device)
    copy_stored(out, qt.stored())
    return out


def copy_stored(out: QuantizedTensor, tensors: dict) -> None:
    """Each of `tensors` ({stored name: tensor}, row-major) copied into out's tensor of that name, byte for byte
    (float8_e8m0fnu has no copy kernel everywhere)."""
    for name, t in tensors.items():
        getattr(out, name).reshape(-1).view(torch.uint8).copy_(t.contiguous().reshape(-1).view(torch.uint8))
