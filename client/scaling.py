"""Delayed scaling: per-tensor scales from the amax of earlier steps, so that a quantize reads its input once.

A training step quantizes a tensor with the scale its history gives and gets that tensor's amax back in the same
pass (QuantdClient.quantize(x, spec, scales=history.scales(), amax=True)); the history keeps the last `length`
values, as Transformer Engine's delayed-scaling recipe keeps its amax history. Values beyond the scale's range
saturate to the format's largest code, which is what the margin (a factor 2**margin on the amax) guards against.
"""
from __future__ import annotations

import collections

import torch

from quantd.kernels.reference import tensor_scale
from quantd.kernels.spec import Granularity, QuantSpec


class AmaxHistory:
    """The last `length` amax values of one tensor and the per-tensor scale they give."""

    def __init__(self, spec: QuantSpec, length: int = 16, margin: int = 0):
        if spec.granularity != Granularity.TENSOR:
            raise ValueError(f"AmaxHistory: delayed scaling needs a per-tensor spec, got {spec.describe()}")
        if length < 1:
            raise ValueError(f"AmaxHistory: length must be >= 1, got {length}")
        self.spec, self.margin = spec, margin
        self.values = collections.deque(maxlen=length)

    def scales(self) -> torch.Tensor | None:
        """The scale of the largest amax kept (times 2**margin), or None before the first step: that step
        computes its own scale (two reads of its input)."""
        if not self.values:
            return None
        return tensor_scale(max(self.values) * 2.0 ** self.margin, self.spec)

    def update(self, amax: float) -> None:
        self.values.append(float(amax))
