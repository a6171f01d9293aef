"""tests/ptx_model.py, the numpy model of the kernels' PTX, against exact arithmetic (fractions) and torch's own
correctly rounded casts: its roundings are what the interpreted PTX paths' tests rest on."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from ptx_model import run, run_packed4


def _exact_round(x: Fraction, mbits: int, emin: int, top: float) -> float:
    """x rounded to nearest even into the format (mbits, emin), exactly (+-inf past top)."""
    if x == 0:
        return 0.0
    e = emin
    a = abs(x)
    while a >= Fraction(2) ** (e + 1):
        e += 1
    q = Fraction(2) ** (e - mbits)
    n, rem = divmod(a, q)
    if rem > q / 2 or (rem == q / 2 and n % 2 == 1):
        n += 1
    r = float(n * q)
    if r > top:
        r = float("inf")
    return r if x > 0 else -r


def _f32_samples(n: int, seed: int) -> np.ndarray:
    """Random fp32 bit patterns weighted to the hard cases: subnormals, near-ties, extremes, signed zeros."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,
                        0x3F000000, 0x33800000, 0x4B000000, 0x40C00000], dtype=np.uint32)
    small = (rng.integers(0, 1 << 23, n // 4) | (rng.integers(100, 150, n // 4) << 23)).astype(np.uint32)
    bits = np.concatenate([special, small, bits])
    return bits[np.isfinite(bits.view(np.float32))]


def test_fma_is_one_rounding_of_the_exact_value():
    a, b, c = (_f32_samples(3000, seed) for seed in (1, 2, 3))
    n = min(len(a), len(b), len(c))
    a, b, c = a[:n], b[:n], c[:n]
    # products near c's magnitude, where the sum cancels or needs more than float64's bits
    with np.errstate(over="ignore"):
        product = (a.view(np.float32) * b.view(np.float32)).view(np.uint32)
    c = np.where(np.arange(n) % 3 == 0, product ^ np.uint32(0x80000000), c)
    c = np.where(np.isfinite(c.view(np.float32)), c, np.uint32(0))
    # (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24 lies on a tie of fp32; +-2**-100 decides it, and float64 cannot hold the
    # sum: rounded to nearest there first, it would land on the tie and round to even.
    tie = np.float32([1 + 2.0 ** -12, -(1 + 2.0 ** -12), 1 + 2.0 ** -12]).view(np.uint32)
    tiny = np.float32([2.0 ** -100, 2.0 ** -100, -(2.0 ** -100)]).view(np.uint32)
    a, b, c = np.concatenate([a, tie]), np.concatenate([b, np.abs(tie.view(np.float32)).view(np.uint32)]), \
        np.concatenate([c, tiny])
    n += 3
    got = run("fma.rn.f32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], 1)[0].view(np.float32)
    top = float(np.finfo(np.float32).max)
    for i in range(n):
        x, y, z = (float(v.view(np.float32)) for v in (a[i], b[i], c[i]))
        want = _exact_round(Fraction(x) * Fraction(y) + Fraction(z), 23, -126, top)
        if want == 0:  # the sign of an exact zero sum: + under round to nearest unless both terms are -0
            assert got[i] == 0, (x, y, z)
        else:
            assert got[i] == want, (x, y, z, got[i], want)


def test_add_is_one_rounding_of_the_exact_sum():
    a, b = (_f32_samples(3000, seed) for seed in (4, 5))
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    # sums that cancel, and terms far apart in magnitude (float64 cannot hold 1 + 2**-100 + ...: rounded to odd)
    b = np.where(np.arange(n) % 3 == 0, a ^ np.uint32(0x80000001), b)
    far = np.float32([1 + 2.0 ** -23, 8388608.0, 2.0 ** 60]).view(np.uint32)
    tiny = np.float32([2.0 ** -100, 0.5, -(2.0 ** -100)]).view(np.uint32)
    a, b = np.concatenate([a, far]), np.concatenate([b, tiny])
    got = run("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], 1)[0].view(np.float32)
    top = float(np.finfo(np.float32).max)
    for i in range(len(a)):
        x, y = float(a[i].view(np.float32)), float(b[i].view(np.float32))
        want = _exact_round(Fraction(x) + Fraction(y), 23, -126, top)
        assert got[i] == want or (want == 0 and got[i] == 0), (x, y, got[i], want)


@pytest.mark.parametrize("op", ["mul", "add", "fma"])
def test_bf16x2_arithmetic_is_one_rounding(op):
    rng = np.random.default_rng(7)
    n = 20000
    h = rng.integers(0, 1 << 16, (3, n), dtype=np.uint32)
    h[:, :64] = np.arange(64, dtype=np.uint32)  # subnormals
    h[2, 64:128] = h[0, 64:128] ^ 0x8000  # fma: sums that cancel (a * 1 + -a, with b = 1 below)
    h[1, 64:128] = 0x3F80
    finite = lambda v: (v & 0x7F80) != 0x7F80  # noqa: E731
    keep = finite(h[0]) & finite(h[1]) & finite(h[2])
    h = h[:, keep]
    a, b, c = h[0] | (h[1] << 16), h[1] | (h[0] << 16), h[2] | (h[2] << 16)
    if op == "fma":
        got = run("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], 1)[0]
    else:
        got = run(f"{op}.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], 1)[0]
    top = (2.0 - 2.0 ** -7) * 2.0 ** 127
    val = lambda v: float((np.uint32(v) << np.uint32(16)).view(np.float32))  # noqa: E731
    exact = {"mul": lambda x, y, z: x * y, "add": lambda x, y, z: x + y, "fma": lambda x, y, z: x * y + z}[op]
    for i in range(0, a.size, 7):
        for shift in (0, 16):
            ha, hb, hc, hr = ((v >> shift) & 0xFFFF for v in (a[i], b[i], c[i], got[i]))
            x, y, z = Fraction(val(ha)), Fraction(val(hb)), Fraction(val(hc))
            want = _exact_round(exact(x, y, z), 7, -126, top)
            assert val(hr) == want or (want == 0 and val(hr) == 0), (val(ha), val(hb), val(hc), val(hr), want)


@pytest.mark.parametrize("op", ["max", "min"])
def test_bf16x2_extremes_keep_nan(op):
    """max.NaN / min.NaN.bf16x2 on every pair of a sample of bf16 values with the specials: torch.maximum /
    torch.minimum (NaN where either is; +0 above -0), the NaN canonical."""
    rng = np.random.default_rng(11)
    specials = np.uint32([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F7F, 0xFF7F, 0x0001, 0x8001])
    h = np.concatenate([specials, rng.integers(0, 1 << 16, 300, dtype=np.uint32)])
    a, b = (v.ravel() for v in np.meshgrid(h, h))
    got = run(f"{op}.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a | (b << 16), b | (a << 16)], 1)[0]
    as_bf16 = lambda v: torch.from_numpy(v.astype(np.int32)).to(torch.int16).view(torch.bfloat16)  # noqa: E731
    x, y = as_bf16(a), as_bf16(b)
    want = getattr(torch, f"{op}imum")(x, y)
    zeros = (x == 0) & (y == 0)  # torch returns its first zero: the model orders -0 below +0
    signs = getattr(torch, f"{op}imum")(torch.ones(1).copysign(x.float()), torch.ones(1).copysign(y.float()))
    want[zeros] = (signs * 0).to(torch.bfloat16)[zeros]
    for half in (got & 0xFFFF, got >> 16):
        res = as_bf16(half)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(res), nan) and np.all(half[nan.numpy()] == 0x7FFF)
        assert torch.equal(res[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_cvt_to_half_pairs_is_torch_cast():
    x = np.concatenate([_f32_samples(50000, 11).view(np.float32), np.float32([np.inf, -np.inf, 65519.99, 65520.0])])
    x = x[: x.size // 2 * 2]
    hi, lo = x[0::2], x[1::2]
    for half, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        got = run(f"cvt.rn.{half}x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], 1)[0]
        want_lo = torch.from_numpy(lo.copy()).to(dtype).view(torch.int16).numpy().view(np.uint16)
        want_hi = torch.from_numpy(hi.copy()).to(dtype).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got & 0xFFFF, want_lo) and np.array_equal(got >> 16, want_hi)


def test_integer_steps_and_operands():
    a = np.array([0xFFFFFFFF, 0x80000000, 5, 0x7FFF0001], dtype=np.uint32)
    asm = """{
        .reg .b32 t, u;
        mad.lo.s32 t, $1, -8388608, 2139095040;
        shr.u32 u, $1, 12;
        max.u16x2 $0, t, u;
        sub.u32 $0, $0, 0x00020002;
        }"""
    got = run(asm, "=r,r", [a], 1)[0]
    t = (a.astype(np.int64) * -8388608 + 2139095040) & 0xFFFFFFFF
    u = a.astype(np.int64) >> 12
    m = np.maximum(t & 0xFFFF, u & 0xFFFF) | (np.maximum(t >> 16, u >> 16) << 16)
    assert np.array_equal(got, ((m - 0x00020002) & 0xFFFFFFFF).astype(np.uint32))
    f = run("min.f32 $0, $1, 0f40C00000;", "=f,f", [np.float32([7.0, np.nan, -1.0, 2.0])], 1)[0].view(np.float32)
    assert f.tolist() == [6.0, 6.0, -1.0, 2.0]
    m = run("min.u32 $0, $1, $2;", "=r,r,r", [a, a[::-1].copy()], 1)[0]
    assert np.array_equal(m, np.minimum(a, a[::-1]))
    with pytest.raises(NotImplementedError, match="div.rn.f32"):
        run("div.rn.f32 $0, $1, $1;", "=f,f", [np.float32([1.0])], 1)


def test_prmt_picks_bytes_and_replicates_signs():
    a, b = np.uint32([0x44332211, 0x80000000]), np.uint32([0x88776655, 0x00008000])
    pick = lambda sel: run(f"prmt.b32 $0, $1, $2, {sel};", "=r,r,r", [a, b], 1)[0].tolist()  # noqa: E731
    assert pick("0x3210") == a.tolist() and pick("0x7654") == b.tolist()
    assert pick("0x0040")[0] == 0x11115511 and pick("0x5410")[0] == 0x66552211
    # sign replication (selector bit 3): bytes 1 and 3 of each word
    assert pick("0xFBD9") == [0xFF000000, 0x00FFFF00]


def test_packed4_groups_elements_and_bytes():
    """pack=4 into bytes: four elements a call, byte j of the output register element j; a count not divisible by
    four padded."""
    x = np.arange(7 * 3, dtype=np.uint32).reshape(7, 3) * 37
    y = np.full((7, 1), 5, dtype=np.uint32)
    asm = "{ .reg .b32 t, u; add.u32 t, $1, $5; add.u32 u, $2, $6; prmt.b32 t, t, u, 0x0040; " \
          "add.u32 u, $3, $7; prmt.b32 t, t, u, 0x0410; add.u32 u, $4, $8; prmt.b32 $0, t, u, 0x4210; }"
    got = run_packed4(asm, "=r" + ",r" * 8, [x, y], 1)[0]
    assert got.shape == (7, 3) and np.array_equal(got, ((x + y) & 0xFF).astype(np.uint8))
