"""Triton dequantize kernel against reference.dequantize, bit for bit (any NaN matches any NaN).

Without a GPU (CI) the kernel runs under the Triton interpreter, where fp8 codes are
decoded from their bits with the format's constants (exact_fp8) and bf16 results are
rounded on the bits (the interpreter's fp32 -> bf16 cast truncates). The `gpu` tests
check the compiled kernel, whose fp8 codes are widened by the hardware, and the
bit-decoding path compiled, on every code and many shapes.
"""
import dataclasses

import pytest
import torch

from quantd.kernels import dispatch, reference
from quantd.kernels.config import DEFAULT
from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.kernels.triton_dequantize import dequantize, launch_geometry
from triton_cases import DTYPES, all_specs, assert_same_values, random_input, reference_quantize, to_device

SPECS = all_specs()
SPEC_IDS = [i for i, _ in SPECS]


def check(qt: QuantizedTensor, out_dtype, **kw):
    want = reference.dequantize(_on_cpu(qt), out_dtype)
    assert_same_values(dequantize(qt, out_dtype, **kw), want)


def _on_cpu(qt: QuantizedTensor) -> QuantizedTensor:
    return to_device(qt, "cpu")


_to = to_device


def random_codes(spec: QuantSpec, shape, gen: torch.Generator) -> QuantizedTensor:
    """Arbitrary code bytes (NaN/Inf codes included), random scales (E8M0: every byte but NaN)
    and zero points: the kernel must decode whatever arrives, not only what quantize writes."""
    cshape, sshape = spec.code_shape(shape), spec.scale_shape(shape)
    codes = torch.randint(0, 256, cshape, generator=gen, dtype=torch.int32).to(torch.uint8)
    if spec.element.bits == 4 and shape[-1] % 2:
        codes[..., -1] &= 0xF  # the pad nibble is zero
    codes = codes.view(spec.code_dtype)
    if spec.scale_dtype == torch.float32:
        scales = torch.exp2(torch.randn(sshape, generator=gen) * 20)
    else:
        scales = torch.randint(0, 255, sshape, generator=gen, dtype=torch.int32).to(torch.uint8)
        if spec.scale_dtype == torch.float8_e4m3fn:  # every E4M3 byte but NaN (nvfp4 never writes it)
            scales = torch.where(scales & 0x7F == 0x7F, scales - 1, scales)
        scales = scales.view(spec.scale_dtype)
    zp = tensor_scale = None
    if spec.format.value == "int8_asym":
        zp = torch.randint(-128, 128, sshape, generator=gen, dtype=torch.int32).to(torch.int8)
    if spec.format.value == "nvfp4":
        tensor_scale = torch.exp2(torch.randn((), generator=gen) * 20)
    return QuantizedTensor(codes, scales, spec, tuple(shape), zp, tensor_scale)


# ---- CI: interpreter, CPU tensors -------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_matches_reference(spec, out_dtype, rng):
    check(reference_quantize(random_input((37, 300), torch.bfloat16, rng), spec), out_dtype)
    check(random_codes(spec, (37, 300), rng), out_dtype)


@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_shapes(spec, rng):
    for shape in ((3, 20, 50), (1000,), (1, 1), (70, 33)):
        check(random_codes(spec, shape, rng), torch.float32)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8", "int8_sym"])
def test_every_code(fmt):
    """All codes under unit and extreme E8M0/fp32 scales."""
    spec = QuantSpec(format=fmt, granularity="group", group_size=32)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(4).reshape(4, 256)
    if spec.element.bits == 4:
        codes = codes.reshape(4, 256)
        shape = (4, 512)
    else:
        shape = (4, 256)
    nb = spec.scale_shape(shape)
    if spec.scale_dtype == torch.float32:
        scales = torch.tensor([1.0, 2.0 ** -149, 3.0e38, 0.1]).reshape(4, 1).expand(nb).contiguous()
    else:
        scales = torch.tensor([127, 0, 254, 3], dtype=torch.uint8).reshape(4, 1).expand(nb).contiguous()
        scales = scales.view(spec.scale_dtype)
    qt = QuantizedTensor(codes.view(spec.code_dtype), scales, spec, shape)
    for out_dtype in DTYPES:
        check(qt, out_dtype)


def test_column_major_scales(rng):
    x = random_input((37, 300), torch.float16, rng)
    for spec in (QuantSpec(), QuantSpec(format="int8_asym"), QuantSpec(format="mxfp4"), QuantSpec(format="nvfp4"),
                 QuantSpec(granularity="tile", tile=(16, 128))):
        qt = dispatch.quantize(x, spec, backend="triton", scale_layout="col")
        assert qt.scales.stride(0) == 1
        check(qt, torch.bfloat16)
        on_cpu = dispatch.quantize(x, spec, backend="cpu", scale_layout="col")  # laid out after quantizing
        assert on_cpu.scales.stride(0) == 1 and list(on_cpu.stored()) == list(qt.stored())
        check(on_cpu, torch.bfloat16)


OUT_SPECS = [QuantSpec(group_size=64), QuantSpec(format="int8_asym", granularity="channel"), QuantSpec("mxfp4"),
             QuantSpec("nvfp4")]


def writes_into_out_checks(spec, rng, device, backends):
    """dequantize(..., out=) fills the given tensor (memory a client shared, in the server) and returns it; a
    tensor of another dtype is refused."""
    qt = reference_quantize(random_input((37, 96), torch.bfloat16, rng), spec)
    want = reference.dequantize(qt, torch.float32)
    for backend in backends:
        out = torch.full((37, 96), 7.0, device=device)
        assert dispatch.dequantize(to_device(qt, device), torch.float32, backend=backend, out=out) is out
        assert_same_values(out.cpu(), want)
    with pytest.raises(ValueError, match="out must be"):
        dequantize(to_device(qt, device), torch.float32, out=torch.empty(37, 96, dtype=torch.bfloat16, device=device))


@pytest.mark.parametrize("spec", OUT_SPECS, ids=str)
def test_writes_into_out(spec, rng):
    writes_into_out_checks(spec, rng, "cpu", ("triton", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", OUT_SPECS, ids=str)
def test_gpu_writes_into_out(spec, rng):
    writes_into_out_checks(spec, rng, "cuda", ("triton",))


def test_round_trip_through_dispatch(rng):
    x = random_input((64, 256), torch.bfloat16, rng)
    qt = dispatch.quantize(x, QuantSpec(format="int8_asym"), backend="triton")
    assert_same_values(dispatch.dequantize(qt, backend="triton"), reference.dequantize(_on_cpu(qt)))


SPLIT_SPECS = [QuantSpec(granularity="tile", tile=(128, 128)), QuantSpec(format="int8_asym", granularity="tile",
                                                                          tile=(128, 128)),
               QuantSpec(format="fp8_e5m2", granularity="tile", tile=(256, 64), scale_encoding="pow2")]


@pytest.mark.parametrize("split", [1, 2, 16, 128])
@pytest.mark.parametrize("spec", SPLIT_SPECS, ids=str)
def test_blocks_split_across_programs(spec, split, rng):
    """KernelConfig.dequant_split: a block's rows dequantized by one program (1) or several, each reading the
    block's scale (16, 128: programs of several blocks' rows side by side)."""
    config = dataclasses.replace(DEFAULT, dequant_split=split)
    for shape in ((300, 260), (129, 100), (1, 5)):
        check(random_codes(spec, shape, rng), torch.float32, config=config)
    check(reference_quantize(random_input((257, 300), torch.bfloat16, rng), spec), torch.bfloat16, config=config)


ROW_SPECS = [QuantSpec(format="int8_sym", granularity="channel", axis=0), QuantSpec(granularity="channel", axis=0),
             QuantSpec(format="int8_asym", group_size=4096)]


@pytest.mark.parametrize("strips", [True, False], ids=["strips", "row_a_program"])
@pytest.mark.parametrize("spec", ROW_SPECS, ids=str)
def test_long_rows_in_strips(spec, strips, rng):
    """KernelConfig.dequant_row_strips: blocks of one row longer than a program are dequantized in strips, each
    element's row scale looked up (True), or one row a program."""
    config = dataclasses.replace(DEFAULT, dequant_tile_elems=256, dequant_row_strips=strips)
    el = spec.element
    blocked = launch_geometry(el, 300, 5000, 1, 5000, config)[1]
    assert blocked is not strips and launch_geometry(el, 300, 5000, 1, 128, config)[1]  # short rows stay blocks
    for shape in ((3, 5000), (40, 257)):
        check(random_codes(spec, shape, rng), torch.float32, config=config)
    check(reference_quantize(random_input((9, 4500), torch.bfloat16, rng), spec), torch.bfloat16, config=config)


def test_bad_input():
    qt = reference.quantize(torch.randn(4, 256), QuantSpec())
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize(qt, torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        dequantize(QuantizedTensor(qt.codes[:, :100], qt.scales, qt.spec, qt.shape), torch.float32)


# ---- GPU: compiled kernel, CUDA tensors ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_gpu_matches_reference(spec, out_dtype, rng):
    if out_dtype != torch.bfloat16 and not spec.is_mx and spec.granularity.value not in ("group", "tensor"):
        pytest.skip("other output dtypes are covered on the group, tensor and MX specs")
    for shape in ((1, 1), (3, 129), (127, 257), (1024, 4096), (4097, 1000)):
        check(_to(random_codes(spec, shape, rng), "cuda"), out_dtype)
    check(_to(reference_quantize(random_input((1024, 1000), torch.bfloat16, rng), spec), "cuda"), out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("exact_fp8", [False, True], ids=["hw_cast", "exact"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8"])
def test_gpu_every_code(fmt, exact_fp8, rng):
    spec = QuantSpec(format=fmt, granularity="group", group_size=32)
    shape = (64, 4096)
    qt = random_codes(spec, shape, rng)
    qt.codes.view(torch.uint8).reshape(-1)[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for out_dtype in DTYPES:
        check(_to(qt, "cuda"), out_dtype, exact_fp8=exact_fp8)


def every_byte_under_every_scale(fmt: str, tensor_scale: float | None = None) -> QuantizedTensor:
    """E2M1 codes, row r: every code byte under scale byte r (E8M0 or E4M3, NaN included)."""
    spec = QuantSpec(fmt)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(256, 1)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8)[:, None].repeat(1, 512 // spec.group_size)
    ts = None if tensor_scale is None else torch.tensor(tensor_scale, dtype=torch.float32)
    return QuantizedTensor(codes, scales.view(spec.scale_dtype), spec, (256, 512), None, ts)


# NVFP4 tensor scales: 1, ones that make the block multiplier inexact, subnormal and past bf16's range
NVFP4_TENSOR_SCALES = (1.0, 3.0, 2688 / 5.5, 0.1, 0.01, 2.0 ** -126, 2.0 ** 100, 2.0 ** 120 * 1.3, 7e-39)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_e2m1_words_every_byte_and_scale(fmt, out_dtype, device):
    """E2M1 codes into bf16 / fp16 by half-precision pairs (e2m1x2_scaled for MXFP4 into bf16, e2m1x2_times
    otherwise; PTX, or its model under the interpreter): every code byte under every scale byte, NaN included
    (NVFP4 under several tensor scales), is the reference's value; so is the fp32 path's (packed_decode off), and
    an output that is not word-aligned (which takes the fp32 path)."""
    seen = set()
    fp32_path = dataclasses.replace(DEFAULT, packed_decode=False)
    # interpreted: the tensor scales that reach both ends of the output's range and an inexact multiplier
    tensor_scales = NVFP4_TENSOR_SCALES if device == "cuda" else (2688 / 5.5, 2.0 ** 120 * 1.3, 7e-39)
    for ts in tensor_scales if fmt == "nvfp4" else (None,):
        qt = every_byte_under_every_scale(fmt, ts)
        want = reference.dequantize(qt, out_dtype)
        w = want.float().abs()
        assert torch.isnan(w[255]).all()
        seen |= {"inf"} if torch.isinf(w).any() else set()
        seen |= {"subnormal"} if ((w > 0) & (w < torch.finfo(out_dtype).tiny)).any() else set()
        on_device = _to(qt, device)
        assert_same_values(dequantize(on_device, out_dtype), want, f"ts {ts}")
        assert_same_values(dequantize(on_device, out_dtype, config=fp32_path), want, f"ts {ts}, fp32 path")
        shifted = torch.empty(256 * 512 + 1, dtype=out_dtype, device=device)[1:].view(256, 512)
        assert dequantize(on_device, out_dtype, out=shifted) is shifted
        assert_same_values(shifted, want, f"ts {ts}, shifted")
    assert seen == {"inf", "subnormal"}  # the cases cover both ends of the output type's range


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 16, 128])
@pytest.mark.parametrize("spec", SPLIT_SPECS, ids=str)
def test_gpu_blocks_split_across_programs(spec, split, rng):
    config = dataclasses.replace(DEFAULT, dequant_split=split)
    for shape in ((1, 1), (127, 257), (4097, 1000), (16384, 4096)):
        check(_to(random_codes(spec, shape, rng), "cuda"), torch.bfloat16, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ROW_SPECS, ids=str)
def test_gpu_long_rows_in_strips(spec, rng):
    for strips in (True, False):
        config = dataclasses.replace(DEFAULT, dequant_row_strips=strips)
        for shape in ((5, 16384), (300, 5000), (16384, 4097)):
            check(_to(random_codes(spec, shape, rng), "cuda"), torch.bfloat16, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(granularity="tile", tile=(128, 128)),
                                  QuantSpec(format="mxfp4"), QuantSpec(format="int8_asym")], ids=str)
def test_gpu_large(spec, rng):
    check(_to(random_codes(spec, (16384, 4096), rng), "cuda"), torch.bfloat16)
