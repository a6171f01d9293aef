"""Properties of the CPU reference (NUMERICS.md), with Hypothesis, and its GEMMs against fp64 products."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from quantd.kernels import dispatch, reference
from quantd.kernels.spec import Format, Granularity, QuantizedTensor, QuantSpec, ScaleEncoding

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_SPECS = [
    QuantSpec(fmt, gran, group_size=gs, tile=(3, 8), block_size=10, axis=ax, scale_encoding=enc)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "int8_sym")
    for enc in ("fp32", "pow2")
    for gran, gs, ax in (("tensor", 128, 0), ("channel", 128, -1), ("group", 16, 0), ("tile", 128, 0), ("flat", 128, 0))
] + [QuantSpec("int8_asym", g) for g in ("tensor", "group", "tile", "flat")] + [
    QuantSpec("int8_asym", "channel", axis=0), QuantSpec("mxfp4"), QuantSpec("mxfp8"), QuantSpec("nvfp4")]
BLOCK_FORMATS = ("mxfp4", "mxfp8", "nvfp4")  # defined on one group size and scale encoding


def finite_arrays(max_dims=3):
    """float32 arrays of 0-3 dims, magnitudes from subnormal to ~1e30, some repeated values (ties)."""
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=1, max_side=20)
    elements = st.one_of(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), st.sampled_from([0.0, -0.0, 1.0, -448.0, 3.0, 0.5]))
    return hnp.arrays(np.float32, shapes, elements=elements)


def usable(spec: QuantSpec, shape) -> bool:
    try:
        spec.check_shape(shape)
        return True
    except ValueError:
        return False


def element_bound(x: torch.Tensor, qt) -> torch.Tensor:
    """Per element, the largest |x - dequantized| the spec allows: half the grid spacing at
    |x| / scale (times the scale), plus what saturation clamps off, plus fp32 rounding of
    the division and the product."""
    spec, el = qt.spec, qt.spec.element
    xb = reference.to_blocks(x, spec).double()
    scale = reference.scale_values(qt).double().reshape(-1, 1)
    q = (xb / scale).abs()
    if el.kind == "int":
        half = torch.full_like(q, 1.0 if spec.format == Format.INT8_ASYM else 0.5)  # asym: zp rounding + clamp
        excess = torch.clamp(q - 127.0, min=0)
    else:
        a = torch.clamp(q, max=el.max)
        e = torch.floor(torch.log2(torch.where(a > 0, a, 1.0))).clamp(min=el.emin)
        half = torch.exp2(e - el.mbits - 1)
        excess = torch.clamp(q - el.max, min=0)
    if spec.format == Format.INT8_ASYM:
        excess = torch.zeros_like(q)  # the whole [min, max] range is representable
    bound = (half + excess) * scale + xb.abs() * 2.0 ** -22 + 1e-44
    return reference.from_blocks(bound, spec, x.shape)


@SETTINGS
@given(spec=st.sampled_from(VALID_SPECS), arr=finite_arrays(), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_round_trip_error_within_half_a_grid_step(spec, arr, dtype):
    x = torch.from_numpy(arr).to(getattr(torch, dtype))
    if not usable(spec, x.shape):
        return
    qt = reference.quantize(x, spec)
    assert qt.codes.shape == spec.code_shape(x.shape) and qt.codes.dtype == spec.code_dtype
    assert qt.scales.shape == spec.scale_shape(x.shape) and qt.scales.dtype == spec.scale_dtype
    deq = reference.dequantize(qt, torch.float32).double()
    assert not torch.isnan(deq).any()
    err = (x.double() - deq).abs()
    assert (err <= element_bound(x.float(), qt)).all()


@SETTINGS
@given(spec=st.sampled_from(VALID_SPECS), arr=finite_arrays(max_dims=3))
def test_non_contiguous_equals_contiguous(spec, arr):
    x = torch.from_numpy(arr)
    if x.dim() < 2:
        x = x.reshape(1, -1)
    xt = x.transpose(0, -1)
    if not usable(spec, xt.shape):
        return
    a, b = reference.quantize(xt, spec), reference.quantize(xt.contiguous(), spec)
    assert torch.equal(a.codes.view(torch.uint8) if a.codes.element_size() == 1 else a.codes,
                       b.codes.view(torch.uint8) if b.codes.element_size() == 1 else b.codes)


@pytest.mark.parametrize("spec", VALID_SPECS, ids=lambda s: s.describe())
def test_all_zero_blocks(spec):
    for shape in [(), (1,), (7,), (4, 33), (2, 3, 40)]:
        if not usable(spec, shape):
            continue
        qt = reference.quantize(torch.zeros(shape), spec)
        # MX takes the smallest E8M0 exponent for a zero amax (NUMERICS.md, Scales), nvfp4 E4M3 0.125 under a
        # tensor scale of 1.0 (compressed-tensors' values); the others scale 1.0
        zero_scale = 2.0 ** -127 if spec.is_mx else 0.125 if spec.format == Format.NVFP4 else 1.0
        assert (reference.scale_values(qt) == zero_scale).all()
        assert not torch.isnan(reference.code_values(qt)).any()
        deq = reference.dequantize(qt, torch.float32)
        assert deq.shape == shape and (deq == 0).all()


def test_single_element_and_ragged_last_block():
    for spec in (QuantSpec(), QuantSpec("fp8_e4m3", "flat", block_size=3), QuantSpec("mxfp4"), QuantSpec("nvfp4"),
                 QuantSpec("int8_asym", "tile", tile=(2, 2))):
        x = torch.tensor([[0.3, -7.0, 2.5, 0.01, 100.0]])
        qt = reference.quantize(x, spec)
        scales = reference.scale_values(qt).reshape(-1)
        blocks = reference.to_blocks(x, spec)
        # the ragged last block's scale comes from its real elements (padding is 0)
        if spec.format == Format.NVFP4:  # one block: E4M3 448 under the tensor scale 448 * 6 / amax
            assert torch.equal(scales, torch.tensor([448.0]) / (torch.tensor(2688.0) / 100.0))
        else:
            assert torch.equal(scales[-1:], reference.compute_scales(blocks[-1:], spec)[0].reshape(-1))
        one = reference.quantize(torch.tensor([-2.0]), spec)
        assert torch.allclose(reference.dequantize(one, torch.float32), torch.tensor([-2.0]), rtol=0.2)


def test_nan_and_inf_semantics():
    x = torch.tensor([[1.0, math.nan, math.inf, -math.inf, -2.0, 0.0]])
    for fmt in Format:
        qt = reference.quantize(x, QuantSpec(fmt) if fmt.value in BLOCK_FORMATS else QuantSpec(fmt, "tensor"))
        el = qt.spec.element
        finite_only = reference.quantize(x[:, [0, 4, 5]], qt.spec)
        assert torch.equal(reference.scale_values(qt), reference.scale_values(finite_only))  # NaN/Inf ignored
        vals = reference.code_values(qt).reshape(-1)
        if el.has_nan:
            assert qt.codes.view(torch.uint8).reshape(-1)[1] == el.nan_code
        elif fmt == Format.INT8_ASYM:
            assert vals[1] == qt.zero_points.float()  # NaN -> the zero point: dequantizes to 0
        else:
            assert vals[1] == 0
        top = 127 if el.kind == "int" else el.max
        if fmt == Format.INT8_ASYM:
            assert vals[2] == 127 and vals[3] == -128
        else:
            assert vals[2] == top and vals[3] == -top  # +-Inf saturates
        report = reference.report(x, qt)
        assert report["nan_count"] == 1 and report["saturated"] >= 2


def test_report_of_a_dequantized_value_that_overflows():
    """fp32's largest value under NVFP4: its divisor s / tensor_scale rounds past amax / 6, so its dequantized
    value overflows to Inf; the report's SQNR is then -inf, not an error."""
    x = torch.full((1, 16), 1.0)
    x[0, 0] = torch.finfo(torch.float32).max
    qt = reference.quantize(x, QuantSpec("nvfp4"))
    assert torch.isinf(reference.dequantize(qt, torch.float32)[0, 0])
    assert reference.report(x, qt)["sqnr_db"] == -math.inf


@pytest.mark.parametrize("fmt,gran,enc", list(itertools.product(
    [f.value for f in Format], [g.value for g in Granularity], [e.value for e in ScaleEncoding])))
def test_every_combination_constructs_or_names_the_field(fmt, gran, enc):
    if fmt in BLOCK_FORMATS:
        valid = gran == "group" and enc == ("e4m3" if fmt == "nvfp4" else "pow2")
    else:
        valid = enc == "fp32" or (enc == "pow2" and fmt != "int8_asym")
    if valid:
        spec = QuantSpec(fmt, gran, scale_encoding=enc)
        assert (spec.format.value, spec.granularity.value, spec.scale_encoding.value) == (fmt, gran, enc)
        x = torch.randn(4, 64)
        assert reference.dequantize(reference.quantize(x, spec)).shape == x.shape
    else:
        with pytest.raises(ValueError, match=r"QuantSpec\.(granularity|scale_encoding)"):
            QuantSpec(fmt, gran, scale_encoding=enc)


@pytest.mark.parametrize("kwargs,field", [
    (dict(format="fp9"), "format"), (dict(granularity="row"), "granularity"), (dict(scale_encoding="log"), "scale_encoding"),
    (dict(group_size=0), "group_size"), (dict(block_size=-1), "block_size"), (dict(tile=(0, 4)), "tile"),
    (dict(out_dtype="int8"), "out_dtype"), (dict(format="mxfp4", group_size=64), "granularity"),
    (dict(format="nvfp4", group_size=32), "granularity"), (dict(format="nvfp4", scale_encoding="fp32"), "scale_encoding"),
    (dict(format="fp8_e4m3", scale_encoding="e4m3"), "scale_encoding")])
def test_invalid_fields_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("spec,shape", [(QuantSpec(), (3, 300)), (QuantSpec(format="mxfp4"), (2, 5, 65)),
                                        (QuantSpec(format="nvfp4"), (2, 3, 37)),
                                        (QuantSpec(format="int8_asym", granularity="tile", tile=(4, 8)), (9, 17)),
                                        (QuantSpec(format="int8_sym", granularity="channel", axis=1), (2, 3, 4))],
                         ids=str)
def test_storage_is_what_quantize_returns(spec, shape):
    """QuantSpec.storage names the shapes and dtypes of the codes, scales, zero points and tensor scale quantize
    gives, and QuantizedTensor.stored / from_stored walk the same names."""
    store = spec.storage(shape)
    qt = reference.quantize(torch.randn(shape), spec)
    assert store.codes == (tuple(qt.codes.shape), qt.codes.dtype)
    assert store.scales == (tuple(qt.scales.shape), qt.scales.dtype)
    assert store.zero_points == (None if qt.zero_points is None else (tuple(qt.zero_points.shape), torch.int8))
    assert (store.zero_points is None) == (spec.format != Format.INT8_ASYM)
    assert store.tensor_scale == (None if qt.tensor_scale is None else ((), torch.float32))
    assert (store.tensor_scale is None) == (spec.format != Format.NVFP4)
    stored = {"codes": qt.codes, "scales": qt.scales, "zero_points": qt.zero_points, "tensor_scale": qt.tensor_scale}
    assert store.tensors() == [(name, tuple(t.shape), t.dtype) for name, t in stored.items() if t is not None]
    assert list(qt.stored()) == [name for name, *_ in store.tensors()]
    again = QuantizedTensor.from_stored(qt.stored(), spec, shape)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(again.stored().values(), qt.stored().values()))


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="dtype"):
        reference.quantize(torch.ones(4, dtype=torch.int32), QuantSpec())
    with pytest.raises(ValueError, match="axis"):
        reference.quantize(torch.ones(4, 4), QuantSpec(granularity="channel", axis=2))
    with pytest.raises(ValueError, match="0-d"):
        reference.quantize(torch.tensor(1.0), QuantSpec())



@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_explicit_scales_are_checked(backend):
    x = torch.randn(4, 256)
    q = lambda spec, s: dispatch.quantize(x, spec, scales=s, backend=backend)  # noqa: E731
    good = torch.full((4, 2), 0.25)
    assert torch.equal(q(QuantSpec(scale_encoding="pow2"), good).scales.float(), good)
    for bad, match in ((torch.full((4, 3), 0.25), "shape"), (torch.zeros(4, 2), "positive"),
                       (torch.full((4, 2), math.nan), "positive"), (torch.full((4, 2), -1.0), "positive")):
        with pytest.raises(ValueError, match=match):
            q(QuantSpec(), bad)
    with pytest.raises(ValueError, match="powers of two"):
        q(QuantSpec(scale_encoding="pow2"), torch.full((4, 2), 0.3))
    with pytest.raises(ValueError, match="int8_asym"):
        q(QuantSpec("int8_asym"), good)
    with pytest.raises(ValueError, match="nvfp4: its tensor scale alone|its tensor scale alone, one value"):
        q(QuantSpec("nvfp4"), torch.full((4, 16), 0.25))  # nvfp4 takes its tensor scale alone


@pytest.mark.parametrize("shape", [(0, 256), (3, 0), (0,), (2, 0, 5)])
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec("mxfp4"), QuantSpec("nvfp4"), QuantSpec(granularity="tensor"),
                                  QuantSpec(granularity="tile"), QuantSpec(granularity="flat")], ids=str)
def test_empty_tensors(spec, shape):
    qt = reference.quantize(torch.empty(shape), spec)
    assert qt.codes.numel() == 0 and tuple(qt.scales.shape) == spec.scale_shape(shape)
    assert tuple(reference.dequantize(qt).shape) == shape

@SETTINGS
@given(arr=finite_arrays(max_dims=2), fmt=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "int8_sym"]))
def test_pow2_scales_never_overflow(arr, fmt):
    x = torch.from_numpy(arr)
    qt = reference.quantize(x, QuantSpec(fmt, "flat", block_size=8, scale_encoding="pow2"))
    assert reference.saturated_count(x, qt) == 0
    s = reference.scale_values(qt)
    assert torch.equal(torch.exp2(torch.round(torch.log2(s))), s)  # powers of two


@SETTINGS
@given(arr=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 70)),
                      elements=st.floats(-2.0 ** 100, 2.0 ** 100, width=32)), fmt=st.sampled_from(["mxfp4", "mxfp8"]))
def test_mx_scale_rule(arr, fmt):
    """OCP MX v1.0: shared exponent = floor(log2 amax) - emax_elem (2 for E2M1, 8 for E4M3)."""
    x = torch.from_numpy(arr)
    spec = QuantSpec(fmt)
    qt = reference.quantize(x, spec)
    assert qt.scales.dtype == torch.float8_e8m0fnu
    amax = reference.to_blocks(x, spec).abs().amax(dim=1).double().numpy()
    emax = {"mxfp4": 2, "mxfp8": 8}[fmt]
    _, ex = np.frexp(amax)
    want = np.where(amax > 0, np.clip(ex - 1 - emax, -127, 127), -127)  # log2(0) = -inf, clamped
    assert torch.equal(qt.scales.view(torch.uint8).reshape(-1).int(), torch.from_numpy((want + 127).astype(np.int32)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_zero_blocks_get_e8m0_zero(backend, fmt, dtype, rng):
    """All-zero and all-NaN/Inf MX blocks: E8M0 bits 0 (2^-127), as microxcaling and torchao write; the
    other blocks keep the OCP rule, and every backend writes the same bytes."""
    x = torch.randn(3, 128, generator=rng)
    x[0, :32] = 0.0
    x[1, 32:64] = float("nan")
    x[2, 96:] = torch.tensor([float("inf"), -float("inf")]).repeat(16)
    x = x.to(dtype)
    on_gpu = backend == "triton" and torch.cuda.is_available()  # compiled there; interpreted without a GPU
    qt = dispatch.quantize(x.cuda() if on_gpu else x, QuantSpec(fmt), backend=backend)
    qt = QuantizedTensor(qt.codes.cpu(), qt.scales.cpu(), qt.spec, qt.shape)
    bits = qt.scales.view(torch.uint8)
    assert bits[0, 0] == 0 and bits[1, 1] == 0 and bits[2, 3] == 0
    emax = {"mxfp4": 2, "mxfp8": 8}[fmt]
    _, ex = np.frexp(x[2, :32].abs().max().item())
    assert bits[2, 0] == ex - 1 - emax + 127
    assert (reference.dequantize(qt, torch.float32)[0, :32] == 0).all()
    assert torch.equal(bits, reference.quantize(x, QuantSpec(fmt)).scales.view(torch.uint8))


# ---- GEMMs against fp64 products ----------------------------------------------------


def test_fp8_block_scaled_gemm(rng):
    """1x128 activations x 128x128 weights: the result is the fp64 product of the dequantized operands."""
    a = torch.randn(48, 384, generator=rng, dtype=torch.float32).bfloat16()
    b = torch.randn(200, 384, generator=rng, dtype=torch.float32).bfloat16()
    qa = reference.quantize(a, QuantSpec("fp8_e4m3", "group", group_size=128))
    qb = reference.quantize(b, QuantSpec("fp8_e4m3", "tile", tile=(128, 128)))
    assert qb.scales.shape == (2, 3)
    out = reference.matmul(qa, qb, torch.float32)
    exact = reference.dequantize(qa, torch.float32).double() @ reference.dequantize(qb, torch.float32).double().T
    assert torch.allclose(out.double(), exact, rtol=2 ** -23, atol=1e-30)
    # and it stays near the unquantized product: an E4M3 code is within 2^-4 of its value relatively, or 2^-10 of
    # the block's scale absolutely (subnormals), which bounds every product's error
    def elementwise_error(x, qt, rows, cols):
        s = reference.scale_values(qt).double()
        s = s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:x.shape[0], :x.shape[1]]
        return 2.0 ** -4 * x.double().abs() + 2.0 ** -10 * s
    ea, eb = elementwise_error(a, qa, 1, 128), elementwise_error(b, qb, 128, 128)
    bound = ea @ b.double().abs().T + a.double().abs() @ eb.T + ea @ eb.T
    true = a.double() @ b.double().T
    assert ((out.double() - true).abs() <= bound * (1 + 2.0 ** -20)).all()
    assert reference.matmul(qa, qb).dtype == torch.bfloat16


def test_int8_gemm_with_zero_points(rng):
    a = torch.randn(33, 100, generator=rng) + 0.7
    b = torch.randn(17, 100, generator=rng)
    qa = reference.quantize(a, QuantSpec("int8_asym", "tensor"))
    qb = reference.quantize(b, QuantSpec("int8_sym", "channel", axis=0))
    out = reference.matmul(qa, qb, torch.float32)
    ca = (qa.codes.double() - qa.zero_points.double()) * qa.scales.double()
    cb = qb.codes.double() * qb.scales.double()[:, None]
    assert torch.allclose(out.double(), ca @ cb.T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="per tensor or per row"):
        reference.matmul(reference.quantize(a, QuantSpec("int8_sym")), qb)


def test_mxfp4_gemm(rng):
    a = torch.randn(8, 96, generator=rng)
    b = torch.randn(12, 96, generator=rng)
    qa, qb = reference.quantize(a, QuantSpec("mxfp4")), reference.quantize(b, QuantSpec("mxfp4"))
    out = reference.matmul(qa, qb, torch.float32)
    exact = reference.dequantize(qa, torch.float32).double() @ reference.dequantize(qb, torch.float32).double().T
    assert torch.allclose(out.double(), exact, rtol=2 ** -23, atol=1e-30)
    with pytest.raises(ValueError, match="mix"):
        reference.matmul(qa, reference.quantize(b, QuantSpec("int8_sym", "tensor")))



def on_meta(qt):
    """A QuantizedTensor's tensors on the meta device, which stands in for another device."""
    def meta(t):
        return None if t is None else t.to("meta")

    return type(qt)(meta(qt.codes), meta(qt.scales), qt.spec, qt.shape, meta(qt.zero_points), meta(qt.tensor_scale))


@pytest.mark.parametrize("spec", VALID_SPECS, ids=lambda s: s.describe())
def test_the_reference_computes_on_the_device_of_its_inputs(spec):
    """The server runs the reference on CUDA tensors (reports, dequantized outputs): no op may make
    its constants on the CPU, and every result stays on its inputs' device."""
    x = torch.randn(8, 64)
    assert reference.quantize(x.to("meta"), spec).codes.is_meta
    assert reference.dequantize(on_meta(reference.quantize(x, spec)), torch.float32).is_meta


@pytest.mark.parametrize("spec", [QuantSpec("int8_sym", "channel", axis=0), QuantSpec("int8_asym", "tensor"),
                                  QuantSpec("mxfp4"), QuantSpec("nvfp4")], ids=lambda s: s.describe())
def test_the_reference_matmul_computes_on_the_device_of_its_inputs(spec):
    qt = on_meta(reference.quantize(torch.randn(8, 64), spec))
    assert reference.matmul(qt, qt).is_meta


def test_one_host_scale_is_checked_as_the_tensor_of_many():
    """A one-element scale on the host is checked as a Python float: the same verdict as the same value among
    several (the tensor path), for every special value, both scale encodings and three dtypes."""
    def verdict(scales, spec, shape):
        try:
            reference.check_scales(scales, spec, shape)
            return "ok"
        except ValueError as e:
            return str(e)

    values = [0.5, 3.0, 0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 2.0 ** -126, 2.0 ** -127, 2.0 ** 127,
              2.0 ** 128, 1e-45, 3.4e38, 1e39]
    for encoding in ("fp32", "pow2"):
        one, many = (QuantSpec(granularity=g, axis=0, scale_encoding=encoding) for g in ("tensor", "channel"))
        for v in values:
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                want = verdict(torch.tensor([v, v], dtype=dtype), many, (2, 4))
                assert verdict(torch.tensor(v, dtype=dtype), one, (2, 4)) == want, (v, dtype, encoding)
