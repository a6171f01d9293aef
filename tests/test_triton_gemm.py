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
import math

import pytest
import torch

from quantd.kernels import gluon_gemm, reference, triton_gemm
from quantd.kernels.spec import QuantizedTensor, QuantSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
FP8_MMA_TOL = 3e-4
OUT_TOL = {torch.float32: FP32_TOL, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

# Every launch config is checked once (test_every_config); the other tests run the first one, which
# keeps the compiled suite from autotuning every shape and spec combination.
ALL_CONFIGS = {"SCALED_CONFIGS": list(triton_gemm.SCALED_CONFIGS), "MX_CONFIGS": list(triton_gemm.MX_CONFIGS),
               "INTERPRETER_CONFIG": list(triton_gemm.INTERPRETER_CONFIG)}


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
    zp = None if qt.zero_points is None else qt.zero_points.to(DEVICE)
    return QuantizedTensor(qt.codes.to(DEVICE), qt.scales.to(DEVICE), qt.spec, qt.shape, zp)


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
    if fmt == "fp8_e4m3" and triton_gemm._interpreting():
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
    with pytest.raises(ValueError, match="MX operand"):
        triton_gemm.matmul(to_device(reference.quantize(x, QuantSpec("mxfp8"))), to_device(fp8))
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
    pairs = MX_PAIRS[:2] if name == "MX_CONFIGS" else [
        BLOCK_SCALED, FP8_PAIRS[0], FP8_PAIRS[2], (INT8_SPECS[3], INT8_SPECS[1])]
    if name == "INTERPRETER_CONFIG":
        pairs = pairs + MX_PAIRS[:1]
    for spec_a, spec_b in pairs:
        check(*quantized_pair(m, n, k, spec_a, spec_b, rng))


# ---- GPU: compiled kernels on larger shapes ----------------------------------------------------

GPU_SHAPES = [(512, 768, 1024), (257, 383, 1100), (1024, 1536, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("kind", ["block_scaled", "per_tensor", "int8_asym", "mxfp4", "mxfp8_x_mxfp4"])
def test_gpu_large(kind, m, n, k, rng):
    specs = {
        "block_scaled": BLOCK_SCALED,
        "per_tensor": (QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp8_e4m3", "tensor")),
        "int8_asym": (INT8_SPECS[3], INT8_SPECS[1]),
        "mxfp4": MX_PAIRS[0],
        "mxfp8_x_mxfp4": MX_PAIRS[1],
    }[kind]
    got, expected = check(*quantized_pair(m, n, k, *specs, rng))
    if kind == "int8_asym":
        assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("spec_a,spec_b", FP8_PAIRS + MX_PAIRS, ids=lambda s: s.describe())
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


# ---- the Gluon kernel (A E4M3 1x128 x B E4M3 128x128 on sm_90) ---------------------------------


def test_gluon_kernel_only_where_it_applies(rng):
    """The interpreter and CPU tensors never reach the Gluon kernel; other recipes never do either."""
    qa, qb = quantized_pair(130, 7, 383, *BLOCK_SCALED, rng)
    assert not triton_gemm._gluon_applies(qa, qb, torch.device("cpu"))
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE:
        assert triton_gemm._gluon_applies(to_device(qa), to_device(qb), torch.device("cuda"))
    for spec_a, spec_b in FP8_PAIRS:
        if (spec_a, spec_b) != BLOCK_SCALED:
            qa, qb = quantized_pair(130, 7, 383, spec_a, spec_b, rng)
            assert not triton_gemm._gluon_applies(to_device(qa), to_device(qb), torch.device(DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (130, 7, 383), (257, 383, 1100), (1000, 1000, 4096),
                                   (2048, 1536, 3072)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_gluon_same_products_as_triton(m, n, k, out_dtype, rng, monkeypatch):
    """matmul's Gluon kernel gives the Triton kernel's products bit for bit (same MMA per K block, same
    scaling order), with row- and column-major scales, fp32 and power-of-two scales."""
    assert torch.cuda.get_device_capability()[0] == 9 and gluon_gemm.AVAILABLE, "needs an sm_90 GPU and Gluon"
    for spec_a, spec_b in (BLOCK_SCALED, FP8_PAIRS[3]):
        qa, qb = (to_device(q) for q in quantized_pair(m, n, k, spec_a, spec_b, rng))
        assert triton_gemm._gluon_applies(qa, qb, qa.codes.device)
        ours = triton_gemm.matmul(qa, qb, out_dtype)
        col = QuantizedTensor(qa.codes, qa.scales.t().contiguous().t(), qa.spec, qa.shape)
        assert torch.equal(triton_gemm.matmul(col, qb, out_dtype), ours)
        monkeypatch.setattr(triton_gemm, "USE_GLUON", False)
        assert torch.equal(triton_gemm.matmul(qa, qb, out_dtype), ours), f"{m}x{n}x{k} {spec_a.describe()}"
        monkeypatch.setattr(triton_gemm, "USE_GLUON", True)
        # fp16 overflows on these magnitudes (products up to ~1e6), where one rounding on either side of
        # 65504 decides Inf; the fp32 products it is rounded from are the ones checked here.
        full = ours if out_dtype != torch.float16 else triton_gemm.matmul(qa, qb, torch.float32)
        assert relative_error(full, reference.matmul(qa, qb, full.dtype)) <= tolerance(qa.spec, full.dtype)
