"""kernels/triton_gemm.matmul against reference.matmul (an fp64 product of the dequantized operands,
or the exact int32 product for INT8).

Without a GPU these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The operands always come from the reference quantizer, so the interpreter's faulty float->fp8 cast
never produces a code here; the GEMM kernels only read codes. The `gpu` tests repeat the checks on
larger shapes with the compiled kernels.

Accuracy: INT8 with fp32 output is exact (int32 accumulation, then the same fp32 scaling as the
reference); FP8 and MX use fp32 accumulation, so their relative error (Frobenius norm) is held to
FP32_TOL; bf16/fp16 outputs get one rounding of the output dtype on top. Exception: Hopper's FP8
tensor-core MMA sums the products inside each instruction in reduced precision before they reach
the fp32 accumulator (about 1.3e-4 relative on random data, the same for cuBLAS per-tensor FP8, see
test_gpu_fp8_as_accurate_as_cublas), so compiled FP8 x FP8 products are held to FP8_MMA_TOL.
"""
import dataclasses
import math
import multiprocessing

import pytest
import torch
import triton
import triton.language as tl

from quantd.kernels import gluon_gemm, reference, triton_gemm
from quantd.kernels.config import DEFAULT
from quantd.kernels.spec import E2M1, QuantizedTensor, QuantSpec
from quantd.kernels.triton_gemm import _mx_values

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
FP8_MMA_TOL = 3e-4
# 16-bit outputs: two sums rounded from nearly equal fp32 values may be one ulp apart, up to 2**-7 of the value in
# bf16 (2**-10 in fp16); where one entry dominates the norm that is the whole relative error (an H100 run gave
# 0.00452 for 130 x 7 x 383 E4M3 per-channel bf16, its largest entry 14272 one ulp, 64, from the reference's).
OUT_TOL = {torch.float32: FP32_TOL, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}

# Every launch config is checked once (test_every_config); the other tests run the first one, which
# keeps the compiled suite from autotuning every shape and spec combination.
ALL_CONFIGS = {"SCALED_CONFIGS": list(triton_gemm.SCALED_CONFIGS), "MX_CONFIGS": list(triton_gemm.MX_CONFIGS),
               "INTERPRETER_CONFIG": list(triton_gemm.INTERPRETER_CONFIG)}

NO_GLUON = dataclasses.replace(DEFAULT, use_gluon=False)  # matmul always through the Triton kernel
# The Gluon kernel with no K split: its products are the Triton kernel's bit for bit (a split adds partials in
# another order; test_gpu_gluon_split_k checks that path).
UNSPLIT = dataclasses.replace(DEFAULT, gemm_gluon_split=False)


@pytest.fixture(autouse=True)
def first_config_only(monkeypatch):
    for name, configs in ALL_CONFIGS.items():
        monkeypatch.setattr(triton_gemm, name, configs[:1])


BLOCK_SCALED = (QuantSpec("fp8_e4m3", "group", group_size=128), QuantSpec("fp8_e4m3", "tile", tile=(128, 128)))


def random_matrix(shape, gen):
    """Normal values times per-row magnitudes spanning 1e-3..1e3, so scales differ block to block."""
    x = torch.randn(shape, generator=gen)
    return x * torch.pow(10.0, torch.empty(shape[0], 1).uniform_(-3, 3, generator=gen))


def to_device(qt: QuantizedTensor) -> QuantizedTensor:
    return QuantizedTensor.from_stored({name: t.to(DEVICE) for name, t in qt.stored().items()}, qt.spec, qt.shape)


def quantized_pair(m, n, k, spec_a, spec_b, gen):
    qa = reference.quantize(random_matrix((m, k), gen), spec_a)
    qb = reference.quantize(random_matrix((n, k), gen), spec_b)
    return qa, qb


def relative_error(c: torch.Tensor, ref: torch.Tensor) -> float:
    """||c - ref|| / ||ref|| over the finite entries; NaN (never passes a `<` check) if the NaN/Inf patterns differ."""
    c, ref = c.double().cpu(), ref.double().cpu()
    if not torch.equal(torch.isnan(c), torch.isnan(ref)) or not torch.equal(torch.isinf(c), torch.isinf(ref)):
        return math.nan
    if not torch.equal(c[torch.isinf(ref)], ref[torch.isinf(ref)]):  # same signs
        return math.nan
    finite = torch.isfinite(ref)
    num, den = (c[finite] - ref[finite]).norm(), ref[finite].norm()
    return float(num / den) if den > 0 else float(num)


def tolerance(spec: QuantSpec, out_dtype=torch.float32) -> float:
    fp8_mma = DEVICE == "cuda" and not spec.is_mx and spec.element.kind == "float"
    return max(OUT_TOL[out_dtype], FP8_MMA_TOL if fp8_mma else 0.0)


def check(qa, qb, out_dtype=torch.float32, tol=None):
    expected = reference.matmul(qa, qb, out_dtype)
    got = triton_gemm.matmul(to_device(qa), to_device(qb), out_dtype)
    assert got.shape == expected.shape and got.dtype == out_dtype and got.device.type == DEVICE
    err = relative_error(got, expected)
    tol = tolerance(qa.spec, out_dtype) if tol is None else tol
    assert err <= tol, f"relative error {err} > {tol} for {qa.spec.describe()} x {qb.spec.describe()}"
    return got, expected


# ---- the check itself --------------------------------------------------------------------------


def test_relative_error_rejects_nan_and_wrong_values():
    ref = torch.randn(8, 8, dtype=torch.float64)
    assert relative_error(ref.clone(), ref) == 0.0
    bad = ref.clone()
    bad[3, 4] = math.nan
    assert not relative_error(bad, ref) <= 1.0  # NaN compares false
    assert not relative_error(ref, bad) <= 1.0
    assert relative_error(ref * 1.001, ref) > FP32_TOL


# ---- FP8 ---------------------------------------------------------------------------------------

RAGGED_SHAPES = [(1, 1, 1), (17, 33, 129), (70, 90, 300), (128, 128, 256), (5, 200, 64), (130, 7, 383)]


@pytest.mark.parametrize("m,n,k", RAGGED_SHAPES)
def test_block_scaled_fp8(m, n, k, rng):
    check(*quantized_pair(m, n, k, *BLOCK_SCALED, rng))


FP8_PAIRS = [
    (QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp8_e4m3", "tensor")),
    (QuantSpec("fp8_e4m3", "channel", axis=0), QuantSpec("fp8_e4m3", "tensor")),
    (QuantSpec("fp8_e5m2", "channel", axis=0), QuantSpec("fp8_e4m3", "channel", axis=-2)),
    (QuantSpec("fp8_e4m3", "group", scale_encoding="pow2"), QuantSpec("fp8_e4m3", "tile", scale_encoding="pow2")),
    (QuantSpec("fp8_e5m2", "group", group_size=256), QuantSpec("fp8_e4m3", "tile", tile=(64, 128))),
    (QuantSpec("fp8_e4m3", "tile", tile=(128, 128)), QuantSpec("fp8_e4m3", "group", group_size=128)),
    (QuantSpec("fp8_e4m3", "group"), QuantSpec("fp8_e4m3", "tensor")),
    (QuantSpec("fp8_e4m3", "channel", axis=0), QuantSpec("fp8_e4m3", "tile", tile=(1, 256))),
]


@pytest.mark.parametrize("spec_a,spec_b", FP8_PAIRS, ids=lambda s: s.describe())
def test_fp8_scalings(spec_a, spec_b, rng):
    check(*quantized_pair(77, 150, 333, spec_a, spec_b, rng))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes(out_dtype, rng):
    a, b = torch.randn(40, 256, generator=rng), torch.randn(72, 256, generator=rng)  # in fp16's range
    check(reference.quantize(a, BLOCK_SCALED[0]), reference.quantize(b, BLOCK_SCALED[1]), out_dtype)


def test_any_scale_and_code_strides(rng):
    """Column-major scales and codes stored transposed give the same product."""
    qa, qb = quantized_pair(50, 140, 260, *BLOCK_SCALED, rng)
    expected = reference.matmul(qa, qb, torch.float32)
    col_major = lambda t: t.t().contiguous().t()  # noqa: E731
    qa2 = QuantizedTensor(col_major(qa.codes), col_major(qa.scales), qa.spec, qa.shape)
    qb2 = QuantizedTensor(col_major(qb.codes), col_major(qb.scales), qb.spec, qb.shape)
    assert qa2.codes.stride(0) == 1 and qa2.scales.stride(0) == 1
    got = triton_gemm.matmul(to_device(qa2), to_device(qb2), torch.float32)
    assert relative_error(got, expected) <= tolerance(qa.spec)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_edge_values(fmt, rng):
    """All-zero blocks, +-max and tiny-scale rows, Inf (saturates) and NaN (propagates to its row)."""
    if fmt == "fp8_e4m3" and triton_gemm.interpreting():
        pytest.skip("the interpreter upcasts fp8 bitwise and reads the E4M3 NaN code 0x7F as 480; "
                    "E4M3 NaN propagation is checked by the gpu run, E5M2 here")
    spec_a = QuantSpec(fmt, "group", group_size=128)
    spec_b = QuantSpec(fmt, "tile", tile=(128, 128))
    m, n, k = 40, 36, 300
    a, b = random_matrix((m, k), rng), random_matrix((n, k), rng)
    a[0] = 0.0                 # every block of row 0 is zero
    a[1, :128] = 0.0           # one zero group
    a[2] = spec_a.element.max * torch.sign(a[2])
    a[3] = a[3] * 1e-30        # tiny scales
    a[4, 5] = math.inf
    a[5, 200] = math.nan
    b[:, 256:] = 0.0           # B's ragged last tile is zero
    b[7, 10] = -math.inf
    got, expected = check(reference.quantize(a, spec_a), reference.quantize(b, spec_b))
    assert torch.isnan(got[5]).all() and not torch.isnan(got[:5]).any() and not torch.isnan(got[6:]).any()
    assert torch.equal(got[0].cpu(), torch.zeros(n))


# ---- INT8 --------------------------------------------------------------------------------------

INT8_SPECS = [QuantSpec("int8_sym", "tensor"), QuantSpec("int8_sym", "channel", axis=0),
              QuantSpec("int8_asym", "tensor"), QuantSpec("int8_asym", "channel", axis=0)]


@pytest.mark.parametrize("spec_b", INT8_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("spec_a", INT8_SPECS, ids=lambda s: s.describe())
def test_int8_exact(spec_a, spec_b, rng):
    qa, qb = quantized_pair(45, 70, 290, spec_a, spec_b, rng)
    got, expected = check(qa, qb)
    assert torch.equal(got.cpu(), expected), "int32 accumulation and fp32 scaling should be exact"


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (33, 129, 17), (128, 64, 256)])
def test_int8_ragged(m, n, k, rng):
    got, expected = check(*quantized_pair(m, n, k, INT8_SPECS[3], INT8_SPECS[1], rng))
    assert torch.equal(got.cpu(), expected)


# ---- MX ----------------------------------------------------------------------------------------

MX_PAIRS = [(QuantSpec("mxfp4"), QuantSpec("mxfp4")), (QuantSpec("mxfp8"), QuantSpec("mxfp4")),
            (QuantSpec("mxfp4"), QuantSpec("mxfp8")), (QuantSpec("mxfp8"), QuantSpec("mxfp8"))]


@pytest.mark.parametrize("spec_a,spec_b", MX_PAIRS, ids=lambda s: s.describe())
@pytest.mark.parametrize("m,n,k", [(3, 5, 7), (70, 90, 200), (64, 130, 257)])
def test_mx(m, n, k, spec_a, spec_b, rng):
    check(*quantized_pair(m, n, k, spec_a, spec_b, rng))


def test_mx_nan_and_bf16_out(rng):
    a, b = random_matrix((20, 100), rng), random_matrix((30, 100), rng)
    a[4, 50] = math.nan  # MXFP4 has no NaN: it encodes as 0, like the reference
    b[3, 3] = math.inf
    check(reference.quantize(a, QuantSpec("mxfp4")), reference.quantize(b, QuantSpec("mxfp4")), torch.bfloat16)


NVFP4_PAIR = (QuantSpec("nvfp4"), QuantSpec("nvfp4"))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 7), (70, 90, 200), (64, 130, 257)])
def test_nvfp4(m, n, k, rng):
    """E4M3 scales over 1x16 groups, the tensor scales divided out at the end, against the reference's fp64
    product of the dequantized operands."""
    check(*quantized_pair(m, n, k, *NVFP4_PAIR, rng))
    qa, qb = quantized_pair(m, n, k, *NVFP4_PAIR, rng)
    check(qa, qb, torch.bfloat16)


def test_nvfp4_extreme_tensor_scales(rng):
    """Tensor scales near fp32's top (amax ~1e-30: 448 * 6 / amax ~3e33, whose square is past fp32) and bottom
    (amax ~1e30), NaN and Inf in the inputs."""
    a = torch.randn(40, 96, generator=rng) * 1e-30
    b = torch.randn(50, 96, generator=rng) * 1e-30
    check(reference.quantize(a, QuantSpec("nvfp4")), reference.quantize(b, QuantSpec("nvfp4")))
    a[3, 5], b[7, 90] = math.nan, math.inf
    check(reference.quantize(a * 1e60, QuantSpec("nvfp4")), reference.quantize(b, QuantSpec("nvfp4")))


@pytest.mark.parametrize("spec_a,spec_b", MX_PAIRS[:2], ids=lambda s: s.describe())
def test_mx_nan_scale(spec_a, spec_b, rng):
    """E8M0 byte 255 is NaN (the reference's reading): every product that uses that group is NaN."""
    qa = reference.quantize(random_matrix((20, 100), rng), spec_a)
    qb = reference.quantize(random_matrix((30, 100), rng).abs(), spec_b)
    scales, codes = qa.scales.clone(), qa.codes.clone()
    scales.view(torch.uint8)[4, 1] = 255
    # That group's values all +1 and B's all >= 0: an Inf scale would give +Inf, not NaN.
    if spec_a.element.bits == 4:
        codes.view(torch.uint8)[4, 16:32] = 0x22  # elements 32..63, two E2M1 1.0 a byte
    else:
        codes.view(torch.uint8)[4, 32:64] = 0x38  # E4M3 1.0
    got, _ = check(QuantizedTensor(codes, scales, qa.spec, qa.shape), qb)
    assert torch.isnan(got[4]).all() and not torch.isnan(got[:4]).any()


# ---- the packed MXFP4 decode (bf16x2 PTX on the GPU), modelled exactly in torch -------------------

BF16_MAX = (2 - 2.0 ** -7) * 2.0 ** 127


def bf16_round_exact(p: torch.Tensor) -> torch.Tensor:
    """RN-even to bf16 of fp64 values that are bf16 values already or lie past bf16's range (+-Inf), and
    NaN: asserts that no other rounding is needed, so the fp64 product is the bf16 multiply's result."""
    finite = torch.isfinite(p)
    big = finite & (p.abs() > BF16_MAX)
    assert (p[big].abs() >= BF16_MAX + 2.0 ** 119).all(), "a product rounds to bf16's max, not to Inf"
    q = p[finite & ~big]
    e = torch.frexp(q)[1].to(torch.float64) - 1  # floor(log2 |q|) where q != 0
    quantum = torch.exp2(torch.clamp(e, min=-126) - 7)
    assert torch.equal(q / quantum, torch.round(q / quantum)), "a product is not a bf16 value"
    out = p.clone()
    out[big] = torch.copysign(torch.full_like(p[big], math.inf), p[big])
    return out.to(torch.float32).to(torch.bfloat16)  # exact: every value is a bf16 or +-Inf or NaN


def bf16_halves(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding two bf16 (element 2i in the low half) -> (..., 2) bf16."""
    halves = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], -1)
    return (halves - ((halves & 0x8000) << 1)).to(torch.int16).view(torch.bfloat16)


def packed_decode_model(byte: torch.Tensor, e8m0: torch.Tensor) -> torch.Tensor:
    """bf16 (..., 2) of e2m1x2_scaled(byte, e8m0_bf16x2(e8m0)), every step as the PTX does it: the
    integer word, then two bf16x2 multiplies, emulated exactly by bf16_round_exact."""
    b = byte.to(torch.int64)
    word = ((b * 0x00040040) & 0x01C001C0) | ((b * 0x01001000) & 0x80008000)
    e = e8m0.to(torch.int64)
    h = torch.where(e == 0, 0x0040, torch.where(e == 255, 0x7FC0, e << 7))
    factor = bf16_halves(h | (h << 16)).double()
    two126 = bf16_halves(torch.tensor(0x7E807E80)).double()
    x = bf16_round_exact(bf16_halves(word).double() * two126)
    return bf16_round_exact(x.double() * factor)


def fp32_decode_model(byte: torch.Tensor, e8m0: torch.Tensor) -> torch.Tensor:
    """bf16 (..., 2) of the fp32 path, as kernels/triton_gemm.py writes it: _e2m1_to_f32(code) *
    _e8m0_to_f32(e) in fp32, cast to bf16."""
    codes = torch.stack([byte.to(torch.int32) & 0xF, byte.to(torch.int32) >> 4], -1)
    exp, man = (codes >> 1) & 3, codes & 1
    bits = torch.where(exp == 0, man * (126 << 23), ((exp + 126) << 23) | (man << 22)) | ((codes & 8) << 28)
    e = e8m0.to(torch.int32)[..., None]
    scale = torch.where(e == 0, 0x00400000, torch.where(e == 255, 0x7FC00000, e << 23)).view(torch.float32)
    return (bits.view(torch.float32) * scale).to(torch.bfloat16)


def every_byte_and_scale():
    """(256 scales, 256 bytes) grids: every pair of E2M1 codes under every E8M0 scale (255 is NaN)."""
    return torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")[::-1]


def same_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN matching NaN (payloads are unspecified)."""
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(a.view(torch.int16)[~nan],
                                                                    b.view(torch.int16)[~nan])


def test_packed_mxfp4_decode_is_the_fp32_decode():
    """Every E2M1 code pair x every E8M0 scale: the packed arithmetic gives the fp32 path's bf16 bits
    (NaN for scale 255), and both are the reference's dequantized values cast to bf16."""
    byte, e = every_byte_and_scale()
    packed, fp32 = packed_decode_model(byte, e), fp32_decode_model(byte, e)
    assert same_bf16(packed, fp32)
    codes = torch.stack([byte & 0xF, byte >> 4], -1)
    scale = e.to(torch.uint8).view(torch.float8_e8m0fnu).float()[..., None]
    ref = (reference.decode_e2m1(codes) * scale).to(torch.bfloat16)
    assert same_bf16(fp32, ref)
    assert torch.isnan(packed[255].float()).all() and not torch.isnan(packed[:255].float()).any()
    # the extremes the products reach: subnormal results, +-Inf past bf16's range, signed zeros
    assert packed[0, 1, 0].item() == 2.0 ** -128 and packed[0, 0x99, 1].item() == -(2.0 ** -128)
    assert packed[254, 0x40, 1].item() == math.inf and packed[254, 0xC0, 1].item() == -math.inf
    assert packed[252, 0x07, 0].item() == 1.5 * 2.0 ** 127
    assert packed[200, 0x88].view(torch.int16).eq(-32768).all()  # -0.0 stays -0.0


@triton.jit
def _decode_tile_kernel(codes_ptr, scales_ptr, out_ptr, ROWS: tl.constexpr, BYTES: tl.constexpr,
                        PACKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """The GEMM's MXFP4 tile decode on program i's (ROWS, BYTES) tile of code bytes (rows i * ROWS on)
    with its (ROWS, BYTES // 16) scales."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    packed = tl.load(codes_ptr + r * BYTES + tl.arange(0, BYTES)[None, :])
    e = tl.load(scales_ptr + r * (BYTES // 16) + tl.arange(0, BYTES // 16)[None, :])
    vals = _mx_values(packed, e, True, ROWS, 2 * BYTES, 32, DOT_FP32, PACKED)
    tl.store(out_ptr + r * (2 * BYTES) + tl.arange(0, 2 * BYTES)[None, :], vals)


def decode_tile(packed: bool) -> torch.Tensor:
    """_mx_values on every byte (columns) under every scale (rows): (256 scales, 256 bytes, 2) bf16."""
    byte, e = every_byte_and_scale()
    codes = byte.to(torch.uint8).to(DEVICE)
    scales = e[:, :16].to(torch.uint8).contiguous().to(DEVICE)  # a row's 16 groups share its scale
    fp32 = triton_gemm.interpreting()  # the interpreter's bf16 cast truncates: there torch rounds
    out = torch.empty((256, 512), dtype=torch.float32 if fp32 else torch.bfloat16, device=DEVICE)
    _decode_tile_kernel[(256 // 16,)](codes, scales, out, ROWS=16, BYTES=256, PACKED=packed, DOT_FP32=fp32)
    return out.cpu().to(torch.bfloat16).reshape(256, 256, 2)


def test_fp32_decode_kernel_matches_model():
    """The kernel's own fp32 path (interpreted without a GPU) on every code pair x scale is the model above."""
    byte, e = every_byte_and_scale()
    assert same_bf16(decode_tile(False), fp32_decode_model(byte, e))


@pytest.mark.gpu
def test_gpu_packed_decode_bit_identical():
    """Compiled: the bf16x2 PTX decode gives the fp32 path's bf16 bits for every code pair x every scale."""
    byte, e = every_byte_and_scale()
    new, old = decode_tile(True), decode_tile(False)
    assert same_bf16(old, fp32_decode_model(byte, e))
    assert same_bf16(new, old)


def mx_operand(rows: int, k: int, spec: QuantSpec, exps: torch.Tensor, gen) -> QuantizedTensor:
    """Random MX codes (no E4M3 NaN; MXFP4's padding nibble zero) under E8M0 scale bits `exps` (rows, groups)."""
    if spec.element is E2M1:
        nib = torch.randint(0, 16, (rows, k + k % 2), generator=gen)
        nib[:, k:] = 0
        codes = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    else:
        b = torch.randint(0, 256, (rows, k), generator=gen)
        codes = torch.where((b & 0x7F) == 0x7F, b - 1, b).to(torch.uint8).view(torch.float8_e4m3fn)
    return QuantizedTensor(codes, exps.to(torch.uint8).view(torch.float8_e8m0fnu), spec, (rows, k))


@pytest.mark.gpu
@pytest.mark.parametrize("spec_a,spec_b", MX_PAIRS, ids=lambda s: s.describe())
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 33, 129), (130, 70, 383), (257, 383, 1100)])
def test_gpu_mx_scales_span_e8m0(m, n, k, spec_a, spec_b, rng, monkeypatch):
    """Scales across E8M0's range, group by group (A's rising, B's falling so that products stay in
    fp32's range): the compiled GEMM against the reference, and the bf16x2 decode's products equal to
    the fp32 decode's bit for bit. 3..246 keeps every E4M3 value times its scale a bf16 (below 3 the
    smallest E4M3 subnormals fall under bf16's) and every value finite; test_gpu_packed_decode_bit_identical
    covers every scale."""
    groups = -(-k // 32)
    base = torch.linspace(3, 244, groups).round().to(torch.int64)
    ea = base[None, :] + torch.randint(0, 3, (m, groups), generator=rng)
    eb = (247 - base)[None, :] + torch.randint(0, 3, (n, groups), generator=rng)
    qa, qb = mx_operand(m, k, spec_a, ea, rng), mx_operand(n, k, spec_b, eb, rng)
    got, _ = check(qa, qb)
    fp32_decode = dataclasses.replace(DEFAULT, packed_decode=False)
    assert torch.equal(triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=fp32_decode), got)


# ---- bad input ---------------------------------------------------------------------------------


def test_rejects_bad_operands(rng):
    x = random_matrix((8, 256), rng)
    fp8 = reference.quantize(x, BLOCK_SCALED[0])
    with pytest.raises(ValueError, match="not supported by the Triton GEMM"):
        triton_gemm.matmul(to_device(reference.quantize(x, QuantSpec("fp8_e4m3", "flat"))), to_device(fp8))
    with pytest.raises(ValueError, match="not supported by the Triton GEMM"):
        group64 = reference.quantize(x, QuantSpec("fp8_e4m3", "group", group_size=64))
        triton_gemm.matmul(to_device(fp8), to_device(group64))
    with pytest.raises(ValueError, match="mix integer"):
        triton_gemm.matmul(to_device(reference.quantize(x, INT8_SPECS[0])), to_device(fp8))
    with pytest.raises(ValueError, match="MX operands with MX ones"):
        triton_gemm.matmul(to_device(reference.quantize(x, QuantSpec("mxfp8"))), to_device(fp8))
    with pytest.raises(ValueError, match="NVFP4 with NVFP4"):
        triton_gemm.matmul(to_device(reference.quantize(x, QuantSpec("nvfp4"))),
                           to_device(reference.quantize(x, QuantSpec("mxfp4"))))
    with pytest.raises(ValueError, match="int8 operands"):
        i8 = to_device(reference.quantize(x, QuantSpec("int8_sym", "group")))
        triton_gemm.matmul(i8, i8)
    with pytest.raises(ValueError, match="expected A"):
        triton_gemm.matmul(to_device(fp8), to_device(reference.quantize(random_matrix((8, 128), rng), BLOCK_SCALED[1])))
    with pytest.raises(TypeError, match="out_dtype"):
        triton_gemm.matmul(to_device(fp8), to_device(fp8), torch.int32)
    with pytest.raises(TypeError, match="codes are"):
        bad = QuantizedTensor(fp8.codes.view(torch.int8), fp8.scales, fp8.spec, fp8.shape)
        triton_gemm.matmul(to_device(bad), to_device(fp8))


def test_empty_dims(rng):
    qa, qb = quantized_pair(4, 6, 0, *BLOCK_SCALED, rng)
    got = triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32)
    assert torch.equal(got.cpu(), torch.zeros(4, 6))


# Every code path of the kernels under every launch config.
CONFIG_CASES = ([("SCALED_CONFIGS", c) for c in ALL_CONFIGS["SCALED_CONFIGS"]]
                + [("MX_CONFIGS", c) for c in ALL_CONFIGS["MX_CONFIGS"]]) if DEVICE == "cuda" else [
    ("INTERPRETER_CONFIG", c) for c in ALL_CONFIGS["INTERPRETER_CONFIG"]]


def config_id(case) -> str:
    if isinstance(case, str):
        return case
    kw = case.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}w{case.num_warps}s{case.num_stages}"
            + ("-flatten" if kw.get("FLATTEN") else "") + ("-pairk" if kw.get("PAIR_K") else "")
            + f"-{kw['CTAS_PER_SM']}perSM")


@pytest.mark.parametrize("name,config", CONFIG_CASES, ids=config_id)
def test_every_config(name, config, monkeypatch, rng):
    monkeypatch.setattr(triton_gemm, name, [config])
    m, n, k = (300, 520, 1100) if DEVICE == "cuda" else (40, 70, 300)
    pairs = MX_PAIRS[:2] + [NVFP4_PAIR] if name == "MX_CONFIGS" else [
        BLOCK_SCALED, FP8_PAIRS[0], FP8_PAIRS[2], (INT8_SPECS[3], INT8_SPECS[1])]
    if name == "INTERPRETER_CONFIG":
        pairs = pairs + MX_PAIRS[:1] + [NVFP4_PAIR]
    for spec_a, spec_b in pairs:
        check(*quantized_pair(m, n, k, spec_a, spec_b, rng))


def test_pair_k_configs_sit_out_gemms_of_one_k_block(monkeypatch, rng):
    """Where K is one K block the autotuner tries each pair-K config as its plain twin (its second block would be
    zero fill; triton 3.8 compiles the pair-K config of 3 stages at K = 1 past an H100's shared memory), also where a
    pair-K config is the only one (an autotuner of one config launches it untried: what failed under 3.8 with
    these tests' first-config-only lists); from two blocks on every config as it is. Products at K = 1 and 128 as the
    reference's."""
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", ALL_CONFIGS["INTERPRETER_CONFIG"])
    kernel = triton_gemm._scaled_gemm_kernel

    def plain(c):
        return {k: v for k, v in c.all_kwargs().items() if k != "PAIR_K"}

    pair_only = [c for c in ALL_CONFIGS["SCALED_CONFIGS"] if c.kwargs.get("PAIR_K")]
    for configs in (ALL_CONFIGS["SCALED_CONFIGS"], triton_gemm.DECODE_CONFIGS, pair_only,
                    ALL_CONFIGS["INTERPRETER_CONFIG"]):
        assert any(c.kwargs.get("PAIR_K") for c in configs)
        twins = triton_gemm._plain_twins(configs)
        assert [c.all_kwargs() for c in twins] == list({str(plain(c)): plain(c) for c in configs}.values())
        assert triton_gemm._tuned(kernel, configs).configs == triton_gemm._launched(configs)
        one = triton_gemm._tuned(kernel, configs, one_k_block=True)
        assert one is triton_gemm._tuned(kernel, configs, one_k_block=True)  # one autotuner a list
        assert [c.all_kwargs() for c in one.configs] == [
            c.all_kwargs() for c in triton_gemm._plain_twins(triton_gemm._launched(configs))]
        assert not any(c.kwargs.get("PAIR_K") for c in one.configs)
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", ALL_CONFIGS["INTERPRETER_CONFIG"][1:])  # pair-K alone
    for k in (1, 128):
        check(*quantized_pair(3, 5, k, *BLOCK_SCALED, rng))


# ---- split K (decode shapes) -------------------------------------------------------------------

SPLIT_PAIRS = [BLOCK_SCALED, FP8_PAIRS[0], FP8_PAIRS[4]]


def split_config(m: int):
    return dataclasses.replace(DEFAULT, gemm_decode_m=m)


@pytest.mark.parametrize("kernel_config", ALL_CONFIGS["INTERPRETER_CONFIG"], ids=config_id)
@pytest.mark.parametrize("m,n,k", [(5, 32, 640), (33, 40, 1000), (1, 20, 300)])
def test_split_k(m, n, k, kernel_config, rng, monkeypatch):
    """KernelConfig.gemm_decode_m: a GEMM of few rows shares each tile's K blocks out over work items (runs of
    whole pairs with PAIR_K; trailing splits may be empty), and a second launch adds the fp32 partials in order:
    block-scaled and row-scaled FP8 against the reference, the same bits on every run."""
    if DEVICE == "cuda":
        pytest.skip("the interpreter's programs; test_gpu_split_k runs the compiled kernel")
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", [kernel_config])
    monkeypatch.setattr(triton_gemm, "_num_programs", lambda device, config: 8)
    config = split_config(64)
    assert triton_gemm._split_k(m, n, k, False, torch.device("cpu"), config) > 1
    int8_unsplit = dataclasses.replace(config, gemm_split_int8=False)
    assert triton_gemm._split_k(m, n, k, True, torch.device("cpu"), int8_unsplit) == 1  # INT8: gemm_split_int8
    assert triton_gemm._split_k(m, n, k, False, torch.device("cpu"), split_config(0)) == 1
    for spec_a, spec_b in SPLIT_PAIRS:
        qa, qb = quantized_pair(m, n, k, spec_a, spec_b, rng)
        expected = reference.matmul(qa, qb, torch.float32)
        got = triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=config)
        assert relative_error(got, expected) <= FP32_TOL
        assert torch.equal(triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=config), got)
        whole = triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=split_config(0))
        assert relative_error(got, whole.double()) <= FP32_TOL


@pytest.mark.parametrize("kernel_config", ALL_CONFIGS["INTERPRETER_CONFIG"], ids=config_id)
@pytest.mark.parametrize("m,n,k", [(5, 32, 640), (33, 40, 1000), (1, 20, 300)])
def test_int8_split_k_is_exact(m, n, k, kernel_config, rng, monkeypatch):
    """KernelConfig.gemm_split_int8: INT8 GEMMs of few rows split K too, their int32 partials (zero points' terms
    included) added exactly before the scales: the unsplit product's bits, which are the reference's."""
    if DEVICE == "cuda":
        pytest.skip("the interpreter's programs; test_gpu_int8_split_k runs the compiled kernel")
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", [kernel_config])
    monkeypatch.setattr(triton_gemm, "_num_programs", lambda device, config: 8)
    config = dataclasses.replace(split_config(64), gemm_split_int8=True)
    assert triton_gemm._split_k(m, n, k, True, torch.device("cpu"), config) > 1
    for spec_a, spec_b in [(INT8_SPECS[1], INT8_SPECS[1]), (INT8_SPECS[3], INT8_SPECS[1]),
                           (INT8_SPECS[2], INT8_SPECS[3]), (INT8_SPECS[0], INT8_SPECS[2])]:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        for out_dtype in (torch.float32, torch.bfloat16):
            got = triton_gemm.matmul(qa, qb, out_dtype, config=config)
            assert torch.equal(got, triton_gemm.matmul(qa, qb, out_dtype, config=split_config(0)))
            assert torch.equal(got.cpu(), reference.matmul(qa, qb, out_dtype).cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
def test_gpu_int8_split_k(m, rng):
    config = dataclasses.replace(split_config(256), gemm_split_int8=True)
    for spec_a, spec_b in [(INT8_SPECS[1], INT8_SPECS[1]), (INT8_SPECS[3], INT8_SPECS[1])]:
        qa_cpu, qb_cpu = quantized_pair(m, 4096, 4096, spec_a, spec_b, rng)
        qa, qb = to_device(qa_cpu), to_device(qb_cpu)
        assert triton_gemm._split_k(m, 4096, 4096, True, qa.codes.device, config) > 1
        got = triton_gemm.matmul(qa, qb, torch.float32, config=config)
        assert torch.equal(got, triton_gemm.matmul(qa, qb, torch.float32, config=split_config(0)))
        assert torch.equal(got.cpu(), reference.matmul(qa_cpu, qb_cpu, torch.float32))  # int64 products: the CPU's


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64, 200])
def test_gpu_split_k(m, rng):
    config = split_config(256)
    for spec_a, spec_b in SPLIT_PAIRS:
        qa, qb = quantized_pair(m, 4096, 4096, spec_a, spec_b, rng)
        expected = reference.matmul(qa, qb, torch.float32)
        got = triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=config)
        assert relative_error(got, expected) <= FP8_MMA_TOL
        assert torch.equal(triton_gemm.matmul(to_device(qa), to_device(qb), torch.float32, config=config), got)


def test_gluon_split_where_tiles_leave_sms_idle(monkeypatch):
    """KernelConfig.gemm_gluon_split: K splits of the Gluon kernel, enough for a work item an SM where its 128 x
    128 tiles fill at most half of them, capped by gemm_max_split and by the pairs of K blocks (on by default);
    off: 1."""
    monkeypatch.setattr(triton_gemm, "sm_count", lambda device: 132)
    on, off = DEFAULT, dataclasses.replace(DEFAULT, gemm_gluon_split=False)
    cuda = torch.device("cuda")
    assert on.gemm_gluon_split
    assert triton_gemm._gluon_split(128, 8192, 8192, cuda, off) == 1
    assert triton_gemm._gluon_split(128, 8192, 8192, cuda, on) == 2  # 64 tiles
    assert triton_gemm._gluon_split(100, 4096, 8192, cuda, on) == 4  # 32 tiles
    assert triton_gemm._gluon_split(100, 128, 8192, cuda, on) == on.gemm_max_split
    assert triton_gemm._gluon_split(100, 128, 300, cuda, on) == 2  # 3 K blocks: 2 pairs
    assert triton_gemm._gluon_split(256, 8192, 8192, cuda, on) == 1  # 128 tiles
    assert triton_gemm._gluon_split(4096, 4096, 4096, cuda, on) == 1


# The Triton kernel splitting K (see triton_split_runs).
TRITON_SPLIT = dataclasses.replace(NO_GLUON, gemm_decode_m=1 << 30)


def triton_split_runs(mp, split: int):
    """Patch triton_gemm (mp: a pytest MonkeyPatch) so that matmul under TRITON_SPLIT splits K in `split` runs of
    whole pairs of K blocks (its pair-K decode config alone), the Gluon kernel's runs; other configs unsplit."""
    mp.setattr(triton_gemm, "DECODE_CONFIGS", [c for c in triton_gemm.DECODE_CONFIGS if c.kwargs.get("PAIR_K")])
    mp.setattr(triton_gemm, "_split_k", lambda *args: split if args[-1] is TRITON_SPLIT else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,split", [(128, 1024, 2048, 2), (128, 1024, 2048, 3), (100, 300, 1100, 3),
                                         (65, 130, 257, 2), (200, 256, 128, 4), (256, 512, 4096, 8)])
def test_gpu_gluon_split_k(m, n, k, split, rng, monkeypatch):
    """The Gluon kernel with each tile's K blocks split over `split` work items (whole pairs, trailing items
    possibly empty; fp32 partials added in order): block-scaled, the Triton kernel's split products bit for bit
    (the same runs of K blocks: its pair-K decode config); row-scaled too, whose Triton runs are not whole pairs,
    so against the reference only; the same bits every run."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    gluon_split = dataclasses.replace(DEFAULT, gemm_decode_m=0, gemm_gluon_split=True)
    triton_split_runs(monkeypatch, split)
    monkeypatch.setattr(triton_gemm, "_gluon_split", lambda *args: split)
    for spec_a, spec_b in [BLOCK_SCALED, FP8_PAIRS[3]] + BLOCK_SCALED_E5M2 + ROW_SCALED:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        what = f"{m}x{n}x{k} split {split} {spec_a.describe()} x {spec_b.describe()}"
        assert triton_gemm._gluon_applies(qa, qb, qa.codes.device), what
        for out_dtype in (torch.float32, torch.bfloat16):
            ours = triton_gemm.matmul(qa, qb, out_dtype, config=gluon_split)
            assert torch.equal(triton_gemm.matmul(qa, qb, out_dtype, config=gluon_split), ours), what
            if triton_gemm._gluon_recipe(qa, qb) == "block-scaled":
                assert torch.equal(triton_gemm.matmul(qa, qb, out_dtype, config=TRITON_SPLIT), ours), what
            assert relative_error(ours, reference.matmul(qa, qb, out_dtype)) <= tolerance(qa.spec, out_dtype), what


# ---- GPU: compiled kernels on larger shapes ----------------------------------------------------

GPU_SHAPES = [(512, 768, 1024), (257, 383, 1100), (1024, 1536, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("kind", ["block_scaled", "per_tensor", "int8_asym", "mxfp4", "mxfp8_x_mxfp4", "nvfp4"])
def test_gpu_large(kind, m, n, k, rng):
    specs = {
        "block_scaled": BLOCK_SCALED,
        "per_tensor": (QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp8_e4m3", "tensor")),
        "int8_asym": (INT8_SPECS[3], INT8_SPECS[1]),
        "mxfp4": MX_PAIRS[0],
        "mxfp8_x_mxfp4": MX_PAIRS[1],
        "nvfp4": NVFP4_PAIR,
    }[kind]
    got, expected = check(*quantized_pair(m, n, k, *specs, rng))
    if kind == "int8_asym":
        assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_a,spec_b", FP8_PAIRS + MX_PAIRS + [NVFP4_PAIR], ids=lambda s: s.describe())
def test_gpu_scalings_bf16(spec_a, spec_b, rng):
    check(*quantized_pair(300, 500, 700, spec_a, spec_b, rng), torch.bfloat16)
    check(*quantized_pair(300, 500, 700, spec_a, spec_b, rng), torch.float32)


@pytest.mark.gpu
def test_gpu_fp8_as_accurate_as_cublas(rng):
    """The FP8 MMA's own rounding: ours is no worse than cuBLAS per-tensor FP8 (fp32 accumulation) on the same codes."""
    qa, qb = quantized_pair(1024, 1536, 2048, QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp8_e4m3", "tensor"), rng)
    expected = reference.matmul(qa, qb, torch.float32)
    qa, qb = to_device(qa), to_device(qb)
    ours = relative_error(triton_gemm.matmul(qa, qb, torch.float32), expected)
    cublas = torch._scaled_mm(qa.codes, qb.codes.t(), scale_a=qa.scales.reshape(()), scale_b=qb.scales.reshape(()),
                              out_dtype=torch.float32, use_fast_accum=False)
    theirs = relative_error(cublas, expected)
    print(f"relative error vs fp64: triton {ours:.3e}, cuBLAS {theirs:.3e}")
    assert ours <= 1.25 * theirs + 1e-7


# ---- the Gluon kernel (FP8 x FP8 on sm_90: A 1x128 x B 128x128, or scales constant along K) ---------

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"
# The products with scales constant along K that gluon_gemm's kernel takes (each operand per tensor or per row).
ROW_SCALED = [
    (QuantSpec(E4M3, "tensor"), QuantSpec(E4M3, "tensor")),
    (QuantSpec(E4M3, "channel", axis=0), QuantSpec(E4M3, "tensor")),
    (QuantSpec(E4M3, "tensor"), QuantSpec(E4M3, "channel", axis=0)),
    (QuantSpec(E4M3, "channel", axis=0), QuantSpec(E4M3, "channel", axis=-2)),
    (QuantSpec(E5M2, "channel", axis=0), QuantSpec(E4M3, "channel", axis=0)),
    (QuantSpec(E4M3, "tensor"), QuantSpec(E5M2, "tensor")),
    (QuantSpec(E5M2, "channel", axis=0), QuantSpec(E5M2, "tensor")),
    (QuantSpec(E4M3, "tensor", scale_encoding="pow2"), QuantSpec(E4M3, "channel", axis=0, scale_encoding="pow2")),
]
BLOCK_SCALED_E5M2 = [
    (QuantSpec(E5M2, "group", group_size=128), QuantSpec(E4M3, "tile", tile=(128, 128))),
    (QuantSpec(E4M3, "group", group_size=128), QuantSpec(E5M2, "tile", tile=(128, 128))),
]
# (A, B, the mode of gluon_gemm's kernel that takes it on sm_90, or None: the Triton kernel does)
GLUON_ROUTES = [(a, b, "block-scaled") for a, b in [BLOCK_SCALED, FP8_PAIRS[3]] + BLOCK_SCALED_E5M2] + [
    (a, b, "row-scaled") for a, b in ROW_SCALED] + [
    (QuantSpec(E5M2, "group", group_size=256), QuantSpec(E4M3, "tile", tile=(64, 128)), None),  # K groups of 256
    (QuantSpec(E4M3, "tile", tile=(128, 128)), QuantSpec(E4M3, "group", group_size=128), None),  # A in tiles
    (QuantSpec(E4M3, "group", group_size=128), QuantSpec(E4M3, "tile", tile=(128, 256)), None),  # B tiles 128x256
    (QuantSpec(E4M3, "group", group_size=128), QuantSpec(E4M3, "group", group_size=128), None),  # B in groups
    (QuantSpec(E4M3, "group", group_size=128), QuantSpec(E4M3, "tensor"), None),  # one operand per K group
    (QuantSpec(E4M3, "channel", axis=0), QuantSpec(E4M3, "tile", tile=(1, 256)), None),
    (QuantSpec(E4M3, "channel", axis=1), QuantSpec(E4M3, "tensor"), None),  # per column: varies along K
    (QuantSpec(E4M3, "flat"), QuantSpec(E4M3, "tensor"), None),
    (INT8_SPECS[0], INT8_SPECS[0], None),
    (INT8_SPECS[3], INT8_SPECS[1], None),
    (QuantSpec("mxfp8"), QuantSpec("mxfp8"), None),
    (QuantSpec("mxfp8"), QuantSpec("mxfp4"), None),
]


def route_id(x) -> str:
    return x.describe() if isinstance(x, QuantSpec) else str(x)


@pytest.mark.parametrize("spec_a,spec_b,mode", GLUON_ROUTES, ids=route_id)
def test_gluon_kernel_only_where_it_applies(spec_a, spec_b, mode, rng, monkeypatch):
    """Which recipes go to the Gluon kernel, and in which mode; the interpreter, CPU tensors and GPUs
    other than sm_90 never reach it. Checked without a GPU by standing in for the device queries."""
    qa, qb = quantized_pair(130, 7, 383, spec_a, spec_b, rng)
    assert triton_gemm._gluon_recipe(qa, qb) == mode
    assert not triton_gemm._gluon_applies(qa, qb, torch.device("cpu"))
    if triton_gemm.interpreting():
        assert not triton_gemm._gluon_applies(qa, qb, torch.device("cuda"))
    on_hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE
    assert triton_gemm._gluon_applies(to_device(qa), to_device(qb), torch.device(DEVICE)) == (
        on_hopper and mode is not None)
    # The device conditions alone, with the queries standing in for a compiled run on each GPU generation.
    monkeypatch.setattr(triton_gemm, "interpreting", lambda: False)
    for major in (8, 9, 10, 12):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        expected = major == 9 and gluon_gemm.AVAILABLE and mode is not None
        assert triton_gemm._gluon_applies(qa, qb, torch.device("cuda")) == expected, major
        assert not triton_gemm._gluon_applies(qa, qb, torch.device("cpu"))
        assert not triton_gemm._gluon_applies(qa, qb, torch.device("cuda"), NO_GLUON)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (130, 7, 383), (257, 383, 1100), (1000, 1000, 4096),
                                   (2048, 1536, 3072)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_gluon_same_products_as_triton(m, n, k, out_dtype, rng, monkeypatch):
    """matmul's Gluon kernel gives the Triton kernel's products bit for bit (same MMA per K block, same
    scaling order), with row- and column-major scales, fp32 and power-of-two scales, E4M3 and E5M2."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    for spec_a, spec_b in [BLOCK_SCALED, FP8_PAIRS[3]] + BLOCK_SCALED_E5M2:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        assert triton_gemm._gluon_applies(qa, qb, qa.codes.device)
        assert triton_gemm._gluon_recipe(qa, qb) == "block-scaled"
        ours = triton_gemm.matmul(qa, qb, out_dtype, config=UNSPLIT)
        col = QuantizedTensor(qa.codes, qa.scales.t().contiguous().t(), qa.spec, qa.shape)
        assert torch.equal(triton_gemm.matmul(col, qb, out_dtype, config=UNSPLIT), ours)
        triton_kernel = triton_gemm.matmul(qa, qb, out_dtype, config=NO_GLUON)
        assert torch.equal(triton_kernel, ours), f"{m}x{n}x{k} {spec_a.describe()}"
        # fp16 overflows on these magnitudes (products up to ~1e6), where one rounding on either side of
        # 65504 decides Inf; the fp32 products it is rounded from are the ones checked here.
        full = ours if out_dtype != torch.float16 else triton_gemm.matmul(qa, qb, torch.float32, config=UNSPLIT)
        assert relative_error(full, reference.matmul(qa, qb, full.dtype)) <= tolerance(qa.spec, full.dtype)


def pair_products(m, n, k, seed):
    """test_gpu_gluon_pairs_same_products' checks, in a child process (spawned: a CUDA context of its own)."""
    rng = torch.Generator().manual_seed(seed)
    for spec_a, spec_b in [BLOCK_SCALED] + BLOCK_SCALED_E5M2:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        for sa in (qa.scales, qa.scales.t().contiguous().t()):
            for out_dtype in (torch.float32, torch.bfloat16):
                what = f"{m}x{n}x{k} {spec_a.describe()} {out_dtype}"
                args = (qa.codes, sa, qb.codes, qb.scales, out_dtype)
                ours = gluon_gemm.blockscaled_matmul(*args, config=gluon_gemm.PAIR)
                assert torch.equal(ours, gluon_gemm.blockscaled_matmul(*args)), what
                assert torch.equal(gluon_gemm.blockscaled_matmul(*args, config=gluon_gemm.PAIR), ours), what


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (130, 7, 383), (512, 256, 512), (256, 128, 768), (257, 383, 1100),
                                   (1000, 1000, 4096), (2048, 1536, 3072)])
def test_gpu_gluon_pairs_same_products(m, n, k, rng):
    """gluon_gemm.PAIR (programs of two CTAs, B multicast, its slots freed on a barrier of the pair) gives the
    default variant's products bit for bit: tiles of 256 rows, ragged in every dimension, several tiles within one
    lap of the ring (512 x 256 x 512: 4 tiles, 4 K blocks), one tile of more K blocks than the ring has slots
    (256 x 128 x 768: 6 of 5), E4M3 and E5M2 A, row- and column-major scales, fp32 and bf16 output,
    and the same bits every run. In a child process with a deadline: a pair that waits for an arrive that never
    comes hangs its launch, which fails this test instead of the run (seen on an H100 at 257 x 383 x 1100)."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    if not gluon_gemm.CLUSTER_AVAILABLE:
        pytest.skip(f"pairs of CTAs need triton 3.9 or later (this is {triton.__version__})")
    seed = int(torch.randint(0, 1 << 31, (1,), generator=rng))
    child = multiprocessing.get_context("spawn").Process(target=pair_products, args=(m, n, k, seed))
    child.start()
    child.join(120)  # compiling the variants takes seconds; the products milliseconds
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"gluon_gemm.PAIR at {m}x{n}x{k} did not finish in 120 s (a hang: seed {seed})")
    assert child.exitcode == 0, f"gluon_gemm.PAIR at {m}x{n}x{k}: the child failed (its traceback above; seed {seed})"


def test_gluon_pairs_refuse_what_they_do_not_run():
    """gluon_gemm.PAIR runs block-scaled, unsplit GEMMs on triton 3.9 or later; anything else is refused by name
    before a launch (here on CPU tensors, where _launch is reached directly)."""
    pair = gluon_gemm.PAIR
    assert (pair.cluster, pair.warpgroups) == (2, 2) and pair not in gluon_gemm.CONFIGS
    assert "cluster2" in repr(pair) and all("cluster" not in repr(cfg) for cfg in gluon_gemm.CONFIGS)
    codes = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    scales = torch.ones(4, 1)
    for scale_per_k, split, what in ((False, 1, "row-scaled"), (True, 2, "split 2")):
        with pytest.raises(ValueError, match=f"block-scaled GEMMs with two warpgroups.*{what}"):
            gluon_gemm._launch(codes, codes, torch.empty(4, 4), scales, scales, (1, 1, 1, 1), scale_per_k, pair,
                               split)


def test_gluon_ring_fits_shared_memory():
    """The ring keeps a variant's depth where it fits beside the output's staging and is cut where it would not (the
    three-warpgroup variant with fp32 output asked an H200 for 262,220 bytes of 232,448 at 4 stages)."""
    h200 = 232448
    two, three = gluon_gemm.CONFIGS[0], gluon_gemm.CONFIGS[-1]
    assert (two.warpgroups, three.warpgroups, three.stages) == (2, 3, 4)
    assert gluon_gemm.ring_stages(two, 4, h200) == two.stages
    assert gluon_gemm.ring_stages(three, 2, h200) == 4
    assert gluon_gemm.ring_stages(three, 4, h200) == 3
    with pytest.raises(ValueError, match="shared memory"):
        gluon_gemm.ring_stages(three, 4, 100_000)


def test_row_scaled_variant_takes_three_warpgroups_where_their_waves_are_fuller():
    """Scales constant along K: 192-row tiles where K is at most 8192, their ring keeps its four stages and their
    last wave, weighed by their 2 % faster tiles, is at least as full as the 128-row tiles'; else the default."""
    two, three, h200 = gluon_gemm.CONFIGS[0], gluon_gemm.THREE_WARPGROUPS, 232448
    variant = gluon_gemm.row_scaled_variant
    assert variant(8192, 8192, 8192, 2, 132, h200) is three  # 2752 tiles in 21 waves (99.3 %) against 4096 in 32
    assert variant(16384, 16384, 8192, 2, 132, h200) is three  # 99.28 % against 99.30 %
    assert variant(16384, 16384, 16384, 2, 132, h200) is two  # K past the limit
    assert variant(2048, 1536, 1024, 2, 132, h200) is three  # 132 tiles: one full wave, against 192 in two
    assert variant(4096, 4096, 4096, 2, 132, h200) is two  # 704 tiles in 6 waves (89 %) against 1024 in 8 (97 %)
    assert variant(1000, 1000, 1000, 2, 132, h200) is two  # 48 tiles on 132 programs against 64
    assert variant(8192, 8192, 8192, 4, 132, h200) is two  # fp32 out: three warpgroups' ring cut to 3 stages
    assert variant(8192, 8192, 8192, 2, 128, h200) is two  # 2752 tiles in 22 waves (97.7 %) against 4096 in 32


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gpu_row_scaled_three_warpgroups_where_chosen(out_dtype, rng):
    """Where matmul picks three warpgroups for a product of scales constant along K (per tensor, per row), it gives
    the bits of two warpgroups and of the Triton kernel."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    from quantd.kernels.launch import shared_memory, sm_count
    device = torch.device("cuda")
    n, k = 1536, 1024
    m = next(rows for rows in range(1024, 16384, 64)  # rows whose tiles fill the waves better three at a time
             if gluon_gemm.row_scaled_variant(rows, n, k, 2, sm_count(device), shared_memory(device))
             is gluon_gemm.THREE_WARPGROUPS)
    for spec_a, spec_b in ROW_SCALED[:2]:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        ours = triton_gemm.matmul(qa, qb, out_dtype)
        assert torch.equal(ours, triton_gemm.matmul(qa, qb, out_dtype, config=dataclasses.replace(
            DEFAULT, gemm_gluon_wide_rows=False))), f"{m}x{n}x{k} {spec_a.describe()}"
        assert torch.equal(ours, triton_gemm.matmul(qa, qb, out_dtype, config=NO_GLUON)), f"{m}x{n}x{k}"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", gluon_gemm.CONFIGS, ids=repr)
@pytest.mark.parametrize("m,n,k", [(130, 7, 383), (257, 383, 1100), (1000, 1000, 4096), (2304, 1920, 384)])
def test_gpu_gluon_variants_same_products_as_triton(cfg, m, n, k, rng):
    """Every launch variant of the Gluon kernel (gluon_gemm.CONFIGS: ring depths, chain lengths, three warpgroups
    of 192-row tiles), block- and row-scaled, unsplit and with its K split in three: the Triton kernel's products
    bit for bit (2304 x 1920: more tiles than an H100 or H200 has SMs, so that programs take several)."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    for spec_a, spec_b in [BLOCK_SCALED, ROW_SCALED[3]]:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        sa, sb = triton_gemm._k_scales(qa, "A")[0], triton_gemm._k_scales(qb, "B")[0]
        gluon = gluon_gemm.blockscaled_matmul if spec_a is BLOCK_SCALED[0] else gluon_gemm.rowscaled_matmul
        what = f"{cfg!r} {m}x{n}x{k} {spec_a.describe()}"
        ours = gluon(qa.codes, sa, qb.codes, sb, torch.float32, config=cfg)
        assert torch.equal(ours, triton_gemm.matmul(qa, qb, torch.float32, config=NO_GLUON)), what
        if spec_a is BLOCK_SCALED[0]:  # the Triton split kernel's runs of K blocks are whole pairs here only
            with pytest.MonkeyPatch.context() as mp:
                triton_split_runs(mp, 3)
                want = triton_gemm.matmul(qa, qb, torch.float32, config=TRITON_SPLIT)
            assert torch.equal(gluon(qa.codes, sa, qb.codes, sb, torch.float32, config=cfg, split=3), want), what


def strided(s: torch.Tensor) -> torch.Tensor:
    """The same per-row scales every other element of a buffer twice as long (stride 2)."""
    t = torch.empty(2 * s.numel(), dtype=s.dtype, device=s.device)[::2]
    t.copy_(s)
    return t


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (130, 7, 383), (257, 383, 1100), (1000, 1000, 4096),
                                   (2048, 1536, 3072)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_gluon_row_scaled_same_products_as_triton(m, n, k, out_dtype, rng, monkeypatch):
    """Scales constant along K (per tensor / per row, E4M3 and E5M2 in any pairing): the Gluon kernel sums
    a fresh MMA product per K block in fp32 and scales by sa * sb after the loop, as the Triton kernel does;
    the outputs are bit-identical, also with strided per-row scales."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    for spec_a, spec_b in ROW_SCALED:
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        what = f"{m}x{n}x{k} {spec_a.describe()} x {spec_b.describe()} {out_dtype}"
        assert triton_gemm._gluon_applies(qa, qb, qa.codes.device) and triton_gemm._gluon_recipe(qa, qb) == "row-scaled"
        ours = triton_gemm.matmul(qa, qb, out_dtype, config=UNSPLIT)
        if qa.scales.dim() == 1 and qb.scales.dim() == 1:
            qa2 = QuantizedTensor(qa.codes, strided(qa.scales), qa.spec, qa.shape)
            qb2 = QuantizedTensor(qb.codes, strided(qb.scales), qb.spec, qb.shape)
            assert torch.equal(triton_gemm.matmul(qa2, qb2, out_dtype, config=UNSPLIT), ours), what
        assert torch.equal(triton_gemm.matmul(qa, qb, out_dtype, config=NO_GLUON), ours), what
        # fp16: compared with the reference through the fp32 products (see the block-scaled test).
        full = ours if out_dtype != torch.float16 else triton_gemm.matmul(qa, qb, torch.float32, config=UNSPLIT)
        assert relative_error(full, reference.matmul(qa, qb, full.dtype)) <= tolerance(qa.spec, full.dtype), what


@pytest.mark.parametrize("spec_a,spec_b", [BLOCK_SCALED, MX_PAIRS[0]], ids=["block-scaled", "mx"])
def test_one_tile_a_program_gives_the_persistent_launchs_bits(spec_a, spec_b, rng):
    """KernelConfig.gemm_persistent=False (one output tile a program, as benchmarks/gemm.py --sweep times it)
    computes every tile as the persistent programs do: the same bits."""
    qa, qb = (to_device(q) for q in quantized_pair(70, 150, 256, spec_a, spec_b, rng))
    one_tile = dataclasses.replace(NO_GLUON, gemm_persistent=False)
    assert triton_gemm._num_programs(qa.codes.device, one_tile) >= 1 << 30
    assert torch.equal(triton_gemm.matmul(qa, qb, torch.float32, config=one_tile),
                       triton_gemm.matmul(qa, qb, torch.float32, config=NO_GLUON))
