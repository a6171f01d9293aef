"""Specs, inputs and bit-for-bit comparisons shared by the Triton kernel tests."""
from __future__ import annotations

import math

import torch

from quantd.kernels import reference
from quantd.kernels.spec import QuantizedTensor, QuantSpec

FP8 = ("fp8_e4m3", "fp8_e5m2")
NON_MX = FP8 + ("int8_sym", "int8_asym")


def _granularities():
    """(id, QuantSpec kwargs) of every granularity, with power-of-two and ragged sizes."""
    return [
        ("group128", dict(granularity="group", group_size=128)),
        ("group48", dict(granularity="group", group_size=48)),
        ("tile128", dict(granularity="tile", tile=(128, 128))),
        ("tile16x24", dict(granularity="tile", tile=(16, 24))),
        ("tensor", dict(granularity="tensor")),
        ("channel0", dict(granularity="channel", axis=0)),
        ("channel-1", dict(granularity="channel", axis=-1)),
        ("flat100", dict(granularity="flat", block_size=100)),
    ]


def all_specs():
    """(id, QuantSpec) for every format x granularity x scale encoding."""
    out = []
    for fmt in NON_MX:
        for encoding in ("fp32", "pow2") if fmt != "int8_asym" else ("fp32",):
            for gid, kw in _granularities():
                out.append((f"{fmt}-{gid}-{encoding}", QuantSpec(format=fmt, scale_encoding=encoding, **kw)))
    out += [("mxfp4", QuantSpec(format="mxfp4")), ("mxfp8", QuantSpec(format="mxfp8")),
            ("nvfp4", QuantSpec(format="nvfp4"))]
    return out


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def random_input(shape, dtype, gen: torch.Generator, edge_cases: bool = True) -> torch.Tensor:
    """Fresh random values over many magnitudes; with edge_cases, also NaN, +-Inf, +-dtype max,
    subnormals, an all-zero leading row and a row of subnormals only."""
    n = math.prod(shape)
    mag = torch.exp2(torch.randint(-12, 12, (n,), generator=gen).float())
    x = (torch.randn(n, generator=gen) * mag).to(dtype)
    if edge_cases and n >= 16:
        fi = torch.finfo(dtype)
        idx = torch.randperm(n, generator=gen)[:12]
        specials = torch.tensor([math.nan, math.inf, -math.inf, fi.max, -fi.max, fi.tiny / 4, -fi.tiny / 2,
                                 fi.tiny, 0.0, -0.0, -math.nan, fi.smallest_normal * 3], dtype=dtype)
        x[idx] = specials
        x = x.reshape(shape)
        if len(shape) >= 2 and shape[0] >= 3:
            x[0] = 0.0
            row = torch.randint(1, 64, x[1].shape, generator=gen).to(torch.float32) * fi.tiny / 64
            x[1] = row.to(dtype)
    return x.reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of a tensor as an integer tensor of the same width, on the CPU."""
    t = t.detach().cpu().contiguous()
    if t.dtype.is_floating_point:
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    return t


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _bits(got), _bits(want)
    bad = (g != w).nonzero()
    if len(bad):
        at = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} of {g.numel()} differ, first at {at}: "
                             f"got {g[at].item():#x} ({got.cpu()[at].float().item()}), "
                             f"want {w[at].item():#x} ({want.cpu()[at].float().item()})")


def assert_same_qt(got: QuantizedTensor, want: QuantizedTensor) -> None:
    """Codes, scales, zero points and tensor scale identical bit for bit (scales compared by value layout)."""
    assert tuple(got.shape) == tuple(want.shape)
    assert list(got.stored()) == list(want.stored())
    for name, t in want.stored().items():
        assert_same_bits(getattr(got, name), t, name)


def to_device(qt: QuantizedTensor, device) -> QuantizedTensor:
    """qt with every stored tensor on `device`."""
    return QuantizedTensor.from_stored({name: t.to(device) for name, t in qt.stored().items()}, qt.spec, qt.shape)


def assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str = "values") -> None:
    """Bitwise equal, except that any NaN matches any NaN."""
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    gn, wn = torch.isnan(got.cpu()), torch.isnan(want.cpu())
    assert torch.equal(gn, wn), f"{what}: NaN at different places ({int((gn != wn).sum())})"
    assert_same_bits(torch.where(gn, 0.0, got.cpu()), torch.where(wn, 0.0, want.cpu()), what)


def reference_quantize(x: torch.Tensor, spec: QuantSpec, scales=None) -> QuantizedTensor:
    return reference.quantize(x.cpu(), spec, None if scales is None else scales.cpu())
