"""The seed documents' APIs and worked examples (shared/seeds/000-003)."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from quantd.kernels import (FP8Format, NumericalOverflowError, deepml_block_quantize, dequantize_fp8,
                            fp8_block_quantize, fp8_gemm, quantize_fp8, quantize_fp8_with_overflow_handling,
                            reference)
from quantd.kernels.spec import QuantSpec


def e4m3(values: np.ndarray) -> np.ndarray:
    """ml_dtypes' E4M3 rounding (RNE) of float32 values, as float64."""
    return values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


# ---- 000 -----------------------------------------------------------------------------


@pytest.mark.parametrize("tensor,block_size,expected", [
    ([1.0, 2.0, 100.0, 200.0], 2,
     [{"block": 0, "scale": 0.004464, "quantized": [224, 448.0]}, {"block": 1, "scale": 0.446429, "quantized": [224, 448.0]}]),
    ([10.0, 10.0, 10.0, 10.0], 2,
     [{"block": 0, "scale": 0.022321, "quantized": [448.0, 448.0]}, {"block": 1, "scale": 0.022321, "quantized": [448.0, 448.0]}]),
    ([-5.0, 10.0, -15.0, 20.0, -25.0, 30.0], 3,
     [{"block": 0, "scale": 0.033482, "quantized": [-149, 299, -448.0]},
      {"block": 1, "scale": 0.066964, "quantized": [299, -373, 448.0]}]),
])
def test_000_examples(tensor, block_size, expected):
    got = deepml_block_quantize(tensor, block_size)
    assert got == expected
    assert [type(v) for d in got for v in d["quantized"]] == [type(v) for d in expected for v in d["quantized"]]


def test_000_ragged_and_zero_blocks(rng):
    x = torch.randn(11, generator=rng)
    x[8:] = 0
    got = deepml_block_quantize(x, 4)
    assert [len(d["quantized"]) for d in got] == [4, 4, 3]
    assert got[2] == {"block": 2, "scale": 1.0, "quantized": [0, 0, 0]}
    amax = float(x[:4].abs().max())
    assert got[0]["scale"] == round(amax / 448, 6)
    with pytest.raises(ValueError, match="block_size"):
        deepml_block_quantize([1.0], 0)


# ---- 001 -----------------------------------------------------------------------------


def seed_listing(weights, block_size=32, fp8_max=448.0):
    """The seed's listing, verbatim in substance: scale = fp8_max / amax, clamp, no FP8 rounding."""
    flat = [v for row in weights for v in row]
    out, scales = [], []
    for start in range(0, len(flat), block_size):
        block = flat[start:start + block_size]
        abs_max = max(abs(v) for v in block)
        scale = 1.0 if abs_max < 1e-12 else fp8_max / abs_max
        scales.append(round(1.0 / scale, 8))
        out += [round(max(-fp8_max, min(fp8_max, v * scale)) / scale, 6) for v in block]
    return out, scales


@pytest.mark.parametrize("block_size,fp8_max", [(32, 448.0), (5, 448.0), (7, 240.0)])
def test_001_flat_blocks_with_real_e4m3_rounding(block_size, fp8_max, rng):
    w = (torch.randn(6, 13, generator=rng) * 3).tolist()
    w[5] = [0.0] * 13  # the tail of the last block is all zero
    got = fp8_block_quantize(w, block_size=block_size, fp8_max=fp8_max)
    flat = np.asarray(w, dtype=np.float32).reshape(-1)
    nblocks = -(-flat.size // block_size)
    assert len(got["scales"]) == nblocks
    want = []
    for b in range(nblocks):  # blocks cross rows
        block = flat[b * block_size:(b + 1) * block_size]
        amax = np.float32(np.abs(block).max())
        scale = np.float32(amax / np.float32(fp8_max)) if amax > 0 else np.float32(1.0)
        assert got["scales"][b] == round(float(scale), 8)
        want += list(e4m3(np.clip(block / scale, -fp8_max, fp8_max)) * np.float64(scale))
    got_flat = [v for row in got["quantized_weights"] for v in row]
    assert got_flat == [round(float(np.float32(v)), 6) for v in want]
    # The seed's listing skips the cast: its output is the input itself, ours is within half an E4M3 step.
    seed_values, seed_scales = seed_listing(w, block_size, fp8_max)
    assert np.allclose(seed_values, flat, atol=1e-6)
    assert np.allclose(got_flat, seed_values, rtol=2.0 ** -4, atol=1e-6)
    assert np.allclose(got["scales"], seed_scales, rtol=1e-6, atol=1e-8)


def test_001_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fp8_max"):
        fp8_block_quantize([[1.0]], fp8_max=1000.0)
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quantize([1.0, 2.0])


@pytest.mark.parametrize("block_size,fp8_max", [(32, 448.0), (5, 448.0), (7, 240.0), (64, 1.5)])
def test_001_listing_numbers_without_fp8_rounding(rng, block_size, fp8_max):
    exponents = torch.randint(-8, 4, (9, 1), generator=rng, dtype=torch.float64)
    exponents[0] = 0  # one row of unit scale, whose values E4M3 rounding always moves at six decimals
    w = torch.randn(9, 13, generator=rng, dtype=torch.float64) * 10.0 ** exponents
    w[2] = 0.0  # an all-zero stretch: the listing's scale 1.0
    w[3, :4] = 1e-13  # below the listing's 1e-12 threshold
    weights = w.tolist()
    got = fp8_block_quantize(weights, block_size=block_size, fp8_max=fp8_max, round_to_fp8=False)
    values, scales = seed_listing(weights, block_size, fp8_max)
    assert got["scales"] == scales
    assert [v for row in got["quantized_weights"] for v in row] == values
    # and the default still rounds to E4M3: values move off the input
    rounded = fp8_block_quantize(weights, block_size=block_size, fp8_max=fp8_max)
    assert rounded["quantized_weights"] != got["quantized_weights"]


# ---- 002 -----------------------------------------------------------------------------

W = torch.tensor([[0.7, -0.2], [-0.5, 0.1]])
X = torch.tensor([[0.8, 0.6]])  # x as a (1, K) operand: quantd's GEMM is A @ B^T


def test_002_int8_walkthrough():
    """W asymmetric per tensor, x symmetric per tensor, int32 accumulation with zero-point correction.

    The seed rounds its intermediates: scale_W 1.2/255 shown as 0.0047, and a zero point of
    -21 where -128 - round(-0.5 / (1.2/255)) = -128 + 106 = -22. With the exact -22, W[1][1]
    encodes as -1 (seed: 0) and the correction is 22 x 222 = 4884 (seed: 4662), giving
    (0.4427, -0.3399) against the seed's (0.434, -0.342) and the true (0.44, -0.34).
    """
    qw = reference.quantize(W, QuantSpec("int8_asym", "tensor"))
    qx = reference.quantize(X, QuantSpec("int8_sym", "tensor"))
    assert qw.zero_points.item() == -22 and qw.codes.tolist() == [[127, -64], [-128, -1]]
    assert qx.codes.tolist() == [[127, 95]]
    assert math.isclose(qw.scales.item(), 1.2 / 255, rel_tol=1e-6) and math.isclose(qx.scales.item(), 0.8 / 127, rel_tol=1e-6)
    out = reference.matmul(qw, qx, torch.float32).reshape(-1)
    acc = torch.tensor([127 * 127 - 64 * 95, -128 * 127 - 1 * 95]) + 22 * (127 + 95)
    assert torch.allclose(out, acc * (qw.scales * qx.scales), rtol=1e-6)
    assert abs(out[0] - 0.434) < 0.01 and abs(out[1] - (-0.342)) < 0.01
    assert abs(out[0] - 0.44) < 0.005 and abs(out[1] - (-0.34)) < 0.005


def test_002_mxfp4_walkthrough():
    """Through the real MX path (1x32 groups: each row of W is its own block, x one block).

    OCP MX: scale = 2^(floor(log2 amax) - 2) = 2^-3 for every block (the seed takes 0.5,
    "a power of 2 near the max"). The E2M1 codes are W -> [[6, -1.5], [-4, 1]] and
    x -> [6, 4]; the seed's scaled values (1.5, -0.375, -1.0, 0.25; 1.5, 1.0) are not all on
    the E2M1 grid (0.375 and 0.25 are not E2M1 values). The products still agree:
    (6*6 - 1.5*4) / 64 = 0.46875 and (-4*6 + 1*4) / 64 = -0.3125, the seed's (0.469, -0.313).
    """
    qw, qx = reference.quantize(W, QuantSpec("mxfp4")), reference.quantize(X, QuantSpec("mxfp4"))
    assert qw.scales.float().reshape(-1).tolist() == [0.125, 0.125] and qx.scales.float().item() == 0.125
    assert reference.code_values(qw).tolist() == [[6.0, -1.5], [-4.0, 1.0]]
    assert reference.code_values(qx).tolist() == [[6.0, 4.0]]
    assert reference.matmul(qw, qx, torch.float32).reshape(-1).tolist() == [0.46875, -0.3125]


# ---- 003 -----------------------------------------------------------------------------


def test_003_quantize_fp8_codes_and_scale(rng):
    x = (torch.randn(64, 48, generator=rng) * 5).half()
    codes, scale = quantize_fp8(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(448 / x.float().abs().max().item(), rel=1e-6)
    divisor = np.float32(1) / scale.numpy()  # quantd's scale is 1 / the seed's multiplier
    q = np.clip(x.float().numpy() / divisor, -448, 448)
    want = q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(codes.numpy(), want)  # raw E4M3 bits
    assert torch.equal(codes.view(torch.float8_e4m3fn).float(), torch.from_numpy(e4m3(q)).float())
    back = dequantize_fp8(codes, scale)
    assert back.dtype == torch.float16
    assert torch.allclose(back.float(), x.float(), rtol=2 ** -4, atol=1e-3)
    assert dequantize_fp8(codes, scale, output_dtype=torch.float32).dtype == torch.float32


def test_003_zero_tensor_and_explicit_scale(rng):
    codes, scale = quantize_fp8(torch.zeros(3, 5))
    assert scale.item() == 1.0 and (codes == 0).all()
    x = torch.randn(100, generator=rng) * 30  # some of x * 10 lies beyond 448 and saturates
    s = torch.tensor(10.0)
    codes, scale = quantize_fp8(x, s)
    assert torch.equal(scale, s)
    q = np.clip(x.numpy() / (np.float32(1) / np.float32(10)), -448, 448)  # quantd divides by 1 / multiplier
    assert np.array_equal(codes.numpy(), q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert np.array_equal(dequantize_fp8(codes, s, torch.float32).numpy(),
                          (e4m3(q) * np.float32(0.1)).astype(np.float32))


def test_003_input_validation():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        quantize_fp8(x.T)
    with pytest.raises(TypeError, match="dtype"):
        quantize_fp8(torch.ones(4, dtype=torch.int32))
    for bad in (torch.tensor(1.0, dtype=torch.float64), torch.ones(2), 2.0):
        with pytest.raises(TypeError, match="float32 scalar"):
            quantize_fp8(x, bad)
    for bad in (torch.tensor(-1.0), torch.tensor(0.0), torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="positive"):
            quantize_fp8(x, bad)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_fp8(x, torch.tensor(1.0))


def test_003_overflow_handling(rng):
    x = torch.randn(256, generator=rng)
    good = FP8Format.compute_scale(x)
    codes, scale = quantize_fp8_with_overflow_handling(x)
    assert torch.equal(scale, good)
    # 3x too large: halved twice, then it fits
    codes, scale = quantize_fp8_with_overflow_handling(x, good * 3)
    assert scale.item() == pytest.approx(good.item() * 3 / 4)
    assert FP8Format.is_in_range(x, scale) and not FP8Format.is_in_range(x, scale * 2)
    assert torch.equal(codes, quantize_fp8(x, scale)[0])
    with pytest.raises(NumericalOverflowError):
        quantize_fp8_with_overflow_handling(x, good * 100)
    x[3] = math.inf
    with pytest.raises(NumericalOverflowError):
        quantize_fp8_with_overflow_handling(x)


def test_003_fp8_format(rng):
    assert FP8Format.max_value == 448.0 and FP8Format.min_normal == 2.0 ** -6
    x = torch.randn(6, 10, generator=rng)
    x[2] = 0
    per_row = FP8Format.compute_scale_per_channel(x, dim=0)
    assert per_row.dtype == torch.float32 and per_row.shape == (6,)
    assert per_row[2] == 1.0 and torch.allclose(per_row[[0, 1]], 448 / x[[0, 1]].abs().amax(1))
    per_col = FP8Format.compute_scale_per_channel(x, dim=1)
    assert torch.allclose(per_col, 448 / x.abs().amax(0))
    assert FP8Format.compute_scale(torch.zeros(3)).item() == 1.0
    s = FP8Format.compute_scale(x)
    assert FP8Format.is_in_range(x, s) and not FP8Format.is_in_range(x, s * 1.2)
    with pytest.raises(ValueError, match="dim"):
        FP8Format.compute_scale_per_channel(x, dim=2)


def test_003_fp8_gemm(rng):
    a = torch.randn(16, 64, generator=rng, dtype=torch.float32).half()
    b = torch.randn(64, 24, generator=rng, dtype=torch.float32).half()
    auto = fp8_gemm(a, b)
    assert auto.shape == (16, 24) and auto.dtype == torch.float16
    (ca, sa), (cb, sb) = quantize_fp8(a), quantize_fp8(b)
    explicit = fp8_gemm(ca, cb, sa, sb)
    assert torch.equal(auto, explicit)
    exact = (dequantize_fp8(ca, sa, torch.float32).double() @ dequantize_fp8(cb, sb, torch.float32).double())
    assert torch.allclose(explicit.double(), exact, rtol=2 ** -10, atol=1e-3)
    true = a.double() @ b.double()
    assert (auto.double() - true).abs().max() < 0.1 * true.abs().max()
    assert torch.equal(fp8_gemm(a, b, output_dtype=torch.float32).half(), auto)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(ca, cb)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        fp8_gemm(a, b.T.contiguous())
