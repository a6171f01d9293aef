"""Every element encoder against an independent one, on every bf16 and fp16 bit pattern and on random fp32.

reference.round_to_grid (integer bit arithmetic) is checked against torch's RNE casts
after explicit clamping, E2M1 (round_to_grid and e2m1_codes) against ml_dtypes, E8M0 scales
against ml_dtypes' float8_e8m0fnu; the CPU backend's native-cast path (torch's cast, and
e2m1_codes of the quotients, inside the compiled graph) against round_to_grid on the same inputs.
"""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from quantd.kernels import cpu, reference
from quantd.kernels.spec import E2M1, E4M3, E5M2, Format, Granularity, QuantSpec

FP8 = {"e4m3": (E4M3, torch.float8_e4m3fn), "e5m2": (E5M2, torch.float8_e5m2)}


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of bf16/fp16, as that dtype."""
    return torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)


def random_fp32(rng: torch.Generator, n: int, emin: int, emax: int) -> torch.Tensor:
    """Random fp32 with uniform random mantissa bits and exponents in [emin, emax] (plus raw random bits)."""
    mant = torch.randint(0, 2 ** 23, (n,), generator=rng, dtype=torch.int32)
    exp = torch.randint(emin + 127, emax + 128, (n,), generator=rng, dtype=torch.int32)
    sign = torch.randint(0, 2, (n,), generator=rng, dtype=torch.int32) << 31
    shaped = (sign | (exp << 23) | mant).view(torch.float32)
    raw = torch.randint(-(2 ** 31), 2 ** 31 - 1, (n // 4,), generator=rng, dtype=torch.int32).view(torch.float32)
    return torch.cat([shaped, raw])


def inputs(source: str, rng: torch.Generator, el) -> torch.Tensor:
    """Finite fp32 values: all bf16 or fp16 patterns, or random fp32 around the format's range."""
    if source == "fp32":
        x = random_fp32(rng, 1 << 18, el.emin - el.mbits - 3, el.emax + 2)
    else:
        x = all_patterns(getattr(torch, source)).float()
    return x[torch.isfinite(x)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("source", ["bfloat16", "float16", "fp32"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_round_to_grid_matches_torch_cast(fmt, source, rng):
    el, dtype = FP8[fmt]
    v = torch.clamp(inputs(source, rng, el), -el.max, el.max)
    grid = reference.round_to_grid(v, el)
    cast = v.to(dtype)
    assert same_bits(grid, cast.float())  # values, signs of zero included
    assert torch.equal(reference.encode_minifloat_bits(grid, el).to(torch.uint8), cast.view(torch.uint8))


@pytest.mark.parametrize("source", ["bfloat16", "float16", "fp32"])
def test_e2m1_matches_ml_dtypes(source, rng):
    v = torch.clamp(inputs(source, rng, E2M1), -E2M1.max, E2M1.max)
    grid = reference.round_to_grid(v, E2M1)
    theirs = v.numpy().astype(ml_dtypes.float4_e2m1fn)
    assert same_bits(grid, torch.from_numpy(theirs.astype(np.float32)))
    bits = reference.encode_minifloat_bits(grid, E2M1)
    codes = torch.from_numpy(theirs.view(np.uint8).astype(np.int32) & 0xF)
    assert torch.equal(bits, codes)
    assert torch.equal(reference.e2m1_codes(grid).int(), codes)  # store_codes' encoder, on grid values
    assert torch.equal(reference.e2m1_codes(v).int(), codes)  # and on the quotients themselves (native_cast)
    assert same_bits(reference.decode_e2m1(bits), grid)


def test_e2m1_codes_at_every_midpoint():
    """The midpoints between E2M1 grid values, the binade edges 2, 4 and 6, zero and the smallest subnormal, each
    with the floats next to it, both signs: e2m1_codes against round_to_grid's codes and ml_dtypes'."""
    points = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 2.0, 4.0, 6.0, 0.0, 1e-45])
    v = torch.cat([points, torch.nextafter(points, torch.tensor(math.inf)), torch.nextafter(points, torch.tensor(0.0))])
    v = v.clamp(max=E2M1.max)
    v = torch.cat([v, -v])
    want = reference.encode_minifloat_bits(reference.round_to_grid(v, E2M1), E2M1)
    assert torch.equal(reference.e2m1_codes(v).int(), want)
    theirs = v.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).astype(np.int32) & 0xF
    assert torch.equal(want, torch.from_numpy(theirs))
    assert reference.e2m1_codes(torch.tensor([math.nan, -math.nan])).tolist() == [0, 0]


def test_e2m1_pack_round_trip(rng):
    codes = torch.randint(0, 16, (5, 33), generator=rng, dtype=torch.int32)
    packed = reference.pack_nibbles(codes)
    assert packed.shape == (5, 17) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], (codes[:, 0] | (codes[:, 1] << 4)).to(torch.uint8))  # low nibble first
    assert torch.equal(reference.unpack_nibbles(packed, 33), codes)
    strided = torch.randint(0, 16, (6, 40), generator=rng, dtype=torch.int32).t()  # (40, 6), not contiguous
    assert torch.equal(reference.pack_nibbles(strided), (strided[:, 0::2] | (strided[:, 1::2] << 4)).to(torch.uint8))


@pytest.mark.parametrize("source", ["bfloat16", "float16", "fp32"])
@pytest.mark.parametrize("ceil", [False, True])
def test_pow2_exponent_and_e8m0_bits(source, ceil, rng):
    s = inputs(source, rng, E4M3).abs()
    s = s[s > 0]
    e = reference.pow2_exponent(s, ceil=ceil)
    sd = s.double().numpy()
    if ceil:  # documented: a subnormal s counts as 2**-126
        sd = np.maximum(sd, 2.0 ** -126)
    m, ex = np.frexp(sd)  # s = m * 2**ex, m in [0.5, 1)
    expect = ex - 1 + ((m != 0.5) if ceil else 0)
    assert torch.equal(e, torch.from_numpy(np.clip(expect, -127, 127).astype(np.int32)))
    # the stored byte is ml_dtypes' E8M0 encoding of 2**e, and torch reads it back as 2**e
    bits = (e + 127).to(torch.uint8)
    pow2 = np.ldexp(1.0, e.numpy().astype(np.int64)).astype(np.float32)
    assert torch.equal(bits, torch.from_numpy(pow2.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)))
    assert torch.equal(bits.view(torch.float8_e8m0fnu).float(), torch.from_numpy(pow2))


def test_nan_and_inf_codes():
    for el, _ in FP8.values():
        v = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 1.0])
        spec = QuantSpec(Format.FP8_E4M3 if el is E4M3 else Format.FP8_E5M2, Granularity.TENSOR)
        codes = reference.quantize(v, spec).codes.view(torch.uint8)
        top = reference.encode_minifloat_bits(torch.tensor([el.max]), el).item()
        assert codes[:4].tolist() == [el.nan_code, el.nan_code, top, top | 0x80]


# ---- the CPU backend's native cast ----------------------------------------------------


@pytest.mark.parametrize("source", ["bfloat16", "float16", "fp32"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_native_cast_matches_round_to_grid(fmt, source, rng):
    """Scale 1 makes the codes the cast of x itself: NaN, Inf and out-of-range values included."""
    spec = QuantSpec(fmt, Granularity.FLAT, block_size=128)
    el = spec.element
    x = inputs(source, rng, el) if source == "fp32" else all_patterns(getattr(torch, source)).float()
    x = torch.cat([x, torch.tensor([math.nan, -math.nan, math.inf, -math.inf, el.max * 1.1, -el.max * 3])])
    x = x.to(torch.float32 if source == "fp32" else getattr(torch, source))
    ones = torch.ones(spec.scale_shape(x.shape))
    want = reference.quantize(x, spec, ones).codes.view(torch.uint8)
    blocks = reference.to_blocks(x, spec)
    eager, *_ = reference.quantize_blocks(blocks, spec, ones, native_cast=True)
    assert torch.equal(reference.store_codes(eager, spec).view(torch.uint8).reshape(-1)[:x.numel()], want)
    assert torch.equal(cpu.quantize(x, spec, ones).codes.view(torch.uint8), want)


@pytest.mark.parametrize("source", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_native_e2m1_matches_reference(fmt, source):
    """E2M1 codes straight from the quotients (e2m1_codes in the compiled graph) against the reference's
    round_to_grid, on every 16-bit pattern (NaN and Inf included) in blocks of mixed magnitudes."""
    x = all_patterns(getattr(torch, source)).reshape(-1, 64)
    spec = QuantSpec(fmt)
    got, want = cpu.quantize(x, spec), reference.quantize(x, spec)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales.view(torch.uint8), want.scales.view(torch.uint8))
