"""Which parts of a tensor can be quantized on their own: before the rest has arrived (the server's
pipeline), or on another stream (the client's parallel streams).

A piece is a run of whole scale blocks that no other block depends on: complete rows for
group granularity, complete rows of tiles for tile, complete blocks for flat, complete
slices along the leading axis for channel(axis 0). Quantizing the pieces one by one gives
exactly the bytes of quantizing the whole tensor (codes and scales are both laid out in
row-major block order). Tensor granularity, channel over any other axis, and nvfp4 (whose tensor
scale comes from every element) need every element before the first scale is known: they run as
one piece once the tensor is in.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from quantd.kernels.spec import Format, Granularity, QuantizedTensor, QuantSpec


@dataclasses.dataclass(frozen=True)
class Piece:
    start: int    # first element (flat index into the input)
    end: int      # one past the last element
    shape: tuple  # shape to quantize the elements with


def unit_shape(spec: QuantSpec, shape: tuple):
    """(elements per aligned unit, shape of `n` units as a function) or None when the tensor is one piece."""
    g = spec.granularity
    if spec.format == Format.NVFP4:
        return None
    if g == Granularity.GROUP:
        k = shape[-1]
        return k, lambda n: (n, k)
    if g == Granularity.TILE:
        k = shape[-1]
        return spec.tile[0] * k, lambda n_rows: (n_rows, k)
    if g == Granularity.FLAT:
        return spec.block_size, lambda n: (n,)
    if g == Granularity.CHANNEL and shape and spec.axis % len(shape) == 0:
        rest = shape[1:]
        return math.prod(rest), lambda n: (n,) + rest
    return None


def plan_pieces(spec: QuantSpec, shape, piece_bytes: int, itemsize: int) -> list:
    """Pieces of about `piece_bytes` input bytes (at least one aligned unit each), in order."""
    shape = tuple(shape)
    numel = math.prod(shape)
    unit = unit_shape(spec, shape)
    if unit is None or numel == 0:
        return [Piece(0, numel, shape)]
    unit_elems, shape_of = unit
    per_piece = max(1, piece_bytes // (unit_elems * itemsize)) * unit_elems
    pieces = []
    for start in range(0, numel, per_piece):
        end = min(start + per_piece, numel)
        if spec.granularity == Granularity.TILE:
            count = (end - start) // shape[-1]  # rows; the last piece may end on a partial tile row
        else:
            count = (end - start) // unit_elems if spec.granularity != Granularity.FLAT else end - start
        pieces.append(Piece(start, end, shape_of(count)))
    return pieces


def piece_scales(pieces: list, spec: QuantSpec, scales: torch.Tensor | None) -> list:
    """The explicit scales of each piece: consecutive runs of the whole tensor's scales (row-major block order),
    each shaped spec.scale_shape(piece.shape); a tensor of one piece keeps them as they are (nvfp4's tensor scale);
    no scales, None for each piece."""
    if scales is None or len(pieces) == 1:
        return [scales] * len(pieces)
    flat, at, out = scales.reshape(-1), 0, []
    for piece in pieces:
        shape = spec.scale_shape(piece.shape)
        out.append(flat[at:at + math.prod(shape)].reshape(shape))
        at += math.prod(shape)
    return out


def join_pieces(parts: list, spec: QuantSpec, shape: tuple) -> QuantizedTensor:
    """The QuantizedTensor of the whole input from those of its pieces, in order (their bytes, concatenated)."""
    def join(tensors, out_shape):
        if len(tensors) == 1:
            return tensors[0].reshape(out_shape)
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
        return flat.view(tensors[0].dtype).reshape(out_shape)
    store = spec.storage(shape)
    return QuantizedTensor.from_stored(
        {name: join([p.stored()[name] for p in parts], getattr(store, name)[0]) for name in parts[0].stored()},
        spec, shape)
