"""Triton quantize kernels against the CPU reference, bit for bit (codes, scales, zero points).

Without a GPU (CI) the kernels run under the Triton interpreter on CPU tensors. The
interpreter's float -> fp8 cast is wrong, so there the kernels encode fp8 with exact
integer arithmetic (exact_fp8, on by default when interpreted): CI checks that path,
for every format and granularity. The hardware fp8 cast used by compiled kernels is
checked by the `gpu` tests (pytest -m gpu on a GPU machine), which also run the
exact path compiled, and every bf16/fp16 bit pattern through both.
"""
import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl

from quantd.kernels import (dispatch, plans, quantize_plan, reference, triton_block_stats, triton_elements,
                           triton_mxfp4_pairs, triton_quantize)
from quantd.kernels.config import DEFAULT, DUAL_PLAN_H100
from quantd.kernels.quantize_plan import Tile, block_geometry, element_constants, schedule, tile_geometry
from quantd.kernels.spec import Granularity, QuantizedTensor, QuantSpec
from quantd.kernels.triton_quantize import quantize, quantize_dual
from triton_cases import DTYPES, FP8, all_specs, assert_same_qt, random_input, reference_quantize, to_device

SPECS = all_specs()
SPEC_IDS = [i for i, _ in SPECS]
DUAL_FORMATS = ("fp8_e4m3", "fp8_e5m2", "int8_sym", "int8_asym", "mxfp8")


def check(x, spec, scales=None, **kw):
    assert_same_qt(quantize(x, spec, scales, **kw), reference_quantize(x, spec, scales))


def check_dual(x, spec, **kw):
    """quantize_dual(x): X's row groups and X^T's, each the reference's quantization of that matrix."""
    rows, cols = quantize_dual(x, spec, **kw)
    assert_same_qt(rows, reference_quantize(x, spec))
    assert_same_qt(cols, reference_quantize(x.T.contiguous(), spec))


# ---- CI: interpreter, CPU tensors -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_matches_reference(spec, dtype, rng):
    check(random_input((37, 300), dtype, rng), spec)


@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_shapes_and_strides(spec, rng):
    """1-D, 3-D and non-contiguous (transposed, sliced) inputs, all-zero and all-subnormal tensors."""
    check(random_input((3, 20, 50), torch.bfloat16, rng), spec)
    check(random_input((1000,), torch.float16, rng), spec)
    check(random_input((160, 70), torch.float32, rng).T, spec)
    check(random_input((40, 400), torch.bfloat16, rng)[::3, 7:390:2], spec)
    check(torch.zeros(5, 70), spec)
    check((torch.randint(-40, 40, (5, 70), generator=rng) * torch.finfo(torch.float32).tiny / 64), spec)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8_asym"])
def test_channel_any_axis(fmt, axis, rng):
    check(random_input((6, 20, 30), torch.bfloat16, rng), QuantSpec(format=fmt, granularity="channel", axis=axis))
    check(random_input((6, 20, 30), torch.float32, rng).permute(2, 0, 1),
          QuantSpec(format=fmt, granularity="channel", axis=axis))


OUT_SPECS = [QuantSpec(group_size=64), QuantSpec(format="int8_asym", granularity="channel"), QuantSpec("mxfp4"),
             QuantSpec("nvfp4"), QuantSpec(granularity="tensor"),
             QuantSpec(format="fp8_e5m2", granularity="tile", tile=(16, 32))]


def writes_into_out_checks(spec, rng, device):
    """quantize(..., out=) fills the given tensors (memory a client shared, in the server) with the reference's
    bits and returns them; with given scales it also finds the amax; a wrong out is refused."""
    from quantd.kernels.triton_quantize import quantize_with_amax
    x = random_input((37, 96), torch.bfloat16, rng)
    want = reference_quantize(x, spec)

    def fresh():  # every byte 7: a tensor the kernels leave unwritten shows
        tensors = {name: torch.empty(shape, dtype=dtype, device=device)
                   for name, shape, dtype in spec.storage(x.shape).tensors()}
        for t in tensors.values():
            t.reshape(-1).view(torch.uint8).fill_(7)
        return QuantizedTensor.from_stored(tensors, spec, x.shape)
    out = fresh()
    assert quantize(x.to(device), spec, out=out) is out
    assert_same_qt(to_device(out, "cpu"), want)
    if spec.scale_encoding.value == "fp32" and spec.format.value != "int8_asym":  # given fp32 scales
        scales = reference.scale_values(want).float().reshape(spec.scale_shape(x.shape))
        out = fresh()
        got, amax = quantize_with_amax(x.to(device), spec, scales.to(device), out=out)
        assert got is out and float(amax) == float(reference.amax(x))
        assert_same_qt(to_device(out, "cpu"), reference_quantize(x, spec, scales))
    wrong = fresh()
    wrong.codes = wrong.codes[:1]
    with pytest.raises(ValueError, match="out.codes"):
        quantize(x.to(device), spec, out=wrong)


@pytest.mark.parametrize("spec", OUT_SPECS, ids=str)
def test_writes_into_out(spec, rng):
    writes_into_out_checks(spec, rng, "cpu")
    x = random_input((37, 96), torch.bfloat16, rng)  # the CPU backend copies into out
    out = QuantizedTensor.from_stored({name: torch.empty(shape, dtype=dtype) for name, shape, dtype
                                       in spec.storage(x.shape).tensors()}, spec, x.shape)
    assert dispatch.quantize(x, spec, backend="cpu", out=out) is out
    assert_same_qt(out, reference_quantize(x, spec))
    if out.codes.dim() == 2 and min(out.codes.shape) > 1:  # a strided out would be written nowhere: refused
        out.codes = out.codes.T.contiguous().T
        with pytest.raises(ValueError, match="out.codes must be a contiguous"):
            dispatch.quantize(x, spec, backend="cpu", out=out)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", OUT_SPECS, ids=str)
def test_gpu_writes_into_out(spec, rng):
    writes_into_out_checks(spec, rng, "cuda")


@pytest.mark.parametrize("spec", [
    QuantSpec(group_size=2048), QuantSpec(format="int8_asym", group_size=20001),
    QuantSpec(format="fp8_e5m2", granularity="tile", tile=(130, 150), scale_encoding="pow2"),
    QuantSpec(format="int8_sym", granularity="flat", block_size=33333)], ids=str)
def test_blocks_too_large_for_registers(spec, rng):
    """Blocks over MAX_REGISTER_BLOCK take the statistics pass (tiles straddle block edges)."""
    check(random_input((300, 700), torch.bfloat16, rng), spec)


@pytest.mark.parametrize("spec", [
    QuantSpec(granularity="tensor"), QuantSpec(format="int8_asym", granularity="tensor"),
    QuantSpec(format="int8_sym", granularity="channel", axis=-1), QuantSpec(granularity="channel", axis=1),
    QuantSpec(format="int8_asym", granularity="channel", axis=0)], ids=str)
def test_statistics_pass_loops(spec, rng):
    """Programs of the statistics pass that reduce several tiles in registers before their atomics."""
    check(random_input((6, 300, 200), torch.bfloat16, rng), spec, config=dataclasses.replace(DEFAULT, stats_programs=2))


STATIC_SPECS = [s for i, s in SPECS
                if "asym" not in i and any(g in i for g in ("group128", "tensor", "channel", "tile16"))]


@pytest.mark.parametrize("spec", STATIC_SPECS + [QuantSpec(format="mxfp8")], ids=str)
def test_explicit_scales(spec, rng):
    """Static quantization: given scales are used as they are (pow2 specs take powers of two only)."""
    x = random_input((37, 300), torch.bfloat16, rng)
    shape = spec.scale_shape(x.shape)
    exponents = torch.randn(shape, generator=rng) * 4
    pow2 = spec.scale_encoding.value == "pow2"
    check(x, spec, torch.exp2(torch.round(exponents) if pow2 else exponents))
    if pow2:
        with pytest.raises(ValueError, match="powers of two"):
            check(x, spec, torch.full(shape, 0.3))
    # Ties: half-integers under a unit scale round to even on every grid.
    halves = (torch.arange(-300, 300, dtype=torch.float32) / 2).reshape(6, 100)
    check(halves, spec, torch.ones(spec.scale_shape(halves.shape)))


@pytest.mark.parametrize("spec", STATIC_SPECS, ids=str)
def test_amax_found_while_quantizing_with_given_scales(spec, rng):
    """Delayed scaling: the pass that quantizes with given scales also finds the input's finite amax (NaN, Inf
    ignored as the per-tensor scale ignores them), on 1-D, 3-D, strided and all-zero inputs."""
    inputs = [random_input((37, 300), torch.bfloat16, rng), random_input((3, 20, 50), torch.float32, rng),
              random_input((40, 400), torch.float16, rng)[::3, 7:390:2], torch.zeros(5, 70),
              torch.full((4, 64), math.nan)]
    for x in inputs:
        scales = torch.exp2(torch.round(torch.randn(spec.scale_shape(x.shape), generator=rng) * 4))
        qt, amax = triton_quantize.quantize_with_amax(x, spec, scales)
        assert_same_qt(qt, reference_quantize(x, spec, scales))
        assert amax.shape == () and amax.dtype == torch.float32
        assert amax.view(torch.int32) == reference.amax(x).view(torch.int32), (amax, reference.amax(x))
    x = inputs[0]
    assert float(reference.amax(x)) == x.float().abs().nan_to_num(0, 0, 0).max()
    # the scale of the tensor's own amax gives per-tensor quantization exactly
    tensor = QuantSpec(spec.format, "tensor", scale_encoding=spec.scale_encoding)
    assert_same_qt(quantize(x, tensor, reference.tensor_scale(reference.amax(x), tensor)), reference_quantize(x, tensor))


@pytest.mark.parametrize("lookup_tile", [(16384, 4), (2048, 1), None], ids=str)
def test_lookup_tiles(lookup_tile, rng):
    """KernelConfig.lookup_tile (and lookup_tile_amax, for programs that report the amax): programs whose blocks'
    scales are looked up (per tensor's second pass, static and delayed scales, groups too large for registers,
    INT8 asym's statistics) over tiles of another size and warps, or (None) of tile_elems by size."""
    config = dataclasses.replace(DEFAULT, lookup_tile=lookup_tile, lookup_tile_amax=lookup_tile)
    for amax in (False, True):
        tile, warps = tile_geometry(1, 300, 37, 300, False, config, amax=amax)
        if lookup_tile is not None:
            assert tile.elems <= lookup_tile[0] and warps == lookup_tile[1]
    amax_apart = dataclasses.replace(DEFAULT, lookup_tile_amax=(2048, 1))  # the amax programs' own setting
    assert tile_geometry(1, 300, 37, 300, False, amax_apart, amax=True)[1] == 1
    assert tile_geometry(1, 300, 37, 300, False, amax_apart)[1] == DEFAULT.lookup_tile[1]
    lookup_tile_checks(random_input((37, 300), torch.bfloat16, rng), config)


def lookup_tile_checks(x, config, device="cpu"):
    """Per tensor (two passes), large groups, channels, and delayed scaling (given scales, the amax found) under
    `config`, against the reference."""
    for spec in (QuantSpec(granularity="tensor"), QuantSpec("int8_asym", "tensor"), QuantSpec(group_size=20001),
                 QuantSpec("int8_sym", "channel", axis=1)):
        check(x.to(device), spec, config=config)
    for spec in (QuantSpec(granularity="tensor"), QuantSpec("int8_sym", "tensor"), QuantSpec(), QuantSpec("mxfp8")):
        own = reference.scale_values(reference_quantize(x, spec)).reshape(spec.scale_shape(x.shape))
        scales = (own * 0.5).clamp(min=2.0 ** -126)  # stale (by a power of two, as E8M0 takes): codes saturate
        qt, amax = triton_quantize.quantize_with_amax(x.to(device), spec, scales.to(device), config=config)
        assert_same_qt(qt, reference_quantize(x, spec, scales))
        assert amax.view(torch.int32).cpu() == reference.amax(x).view(torch.int32)


def guarded_delayed_checks(fmt: str, rng, device: str = "cpu") -> None:
    """Delayed scaling (a given per-tensor scale, the amax found in the same read) by the guarded quotient: rows of
    quotients within 2 ulps of the points where a code changes, next to rows holding an Inf, a NaN, quotients
    around the guard's clamp at 2**17 and past it, a finite x whose quotient overflows, signed zeros: codes and
    amax the reference's (and the reciprocal's products alone would miss codes: asserted)."""
    points = code_boundaries(fmt)
    scale = torch.tensor([3.3 / 448])
    x = nudged(points[torch.randint(0, len(points), (24, 4096), generator=rng)] * scale, rng)
    s = float(scale)
    specials = [math.inf, -math.inf, math.nan, 65000.0 * s, -70000.0 * s, 131072.0 * s, -131072.0 * s * (1 + 2 ** -20),
                131071.0 * s, 2e5 * s, -3e38, 3e38, -0.0]
    for row, value in enumerate(specials, start=12):
        x[row, 100 * row: 100 * row + 3] = value
    spec = QuantSpec(fmt, "tensor")
    want = reference_quantize(x, spec, scale)
    assert (codes_of_quotients(x[:8] * (1 / scale), want) != want.codes.view(torch.uint8)[:8]).sum() > 0
    qt, amax = triton_quantize.quantize_with_amax(x.to(device), spec, scale.to(device))
    assert_same_qt(to_device(qt, "cpu"), want)
    assert amax.view(torch.int32).cpu() == reference.amax(x).view(torch.int32)
    check(x.to(device), spec, scale.to(device))  # the same scale, no amax


@pytest.mark.parametrize("fmt", ("fp8_e4m3", "fp8_e5m2", "int8_sym"))
def test_guarded_delayed(fmt, rng):
    guarded_delayed_checks(fmt, rng)


def delayed_words_checks(launch, rng, monkeypatch, device="cpu") -> None:
    """Delayed scaling of bf16 rows read as words (KernelConfig.delayed_words = launch): codes, stored scale and amax
    the reference's for random tensors, rows with an Inf or NaN, all-NaN and all-zero tensors, every bf16 value, ragged
    tiles, a slice of even row stride, quotients near the points where a code changes, and scales inside and outside
    [CORRECTED_MIN, CORRECTED_MAX] (own, stale, 2**-100, 2**110), E4M3, E5M2 and power-of-two scales; the inputs the
    words cannot read (odd width, misaligned, fp32, strided columns) and other specs keep the other programs."""
    config = dataclasses.replace(DEFAULT, delayed_words=launch)
    taken = []
    words = triton_quantize.delayed_words
    monkeypatch.setattr(triton_quantize, "delayed_words", lambda *a: taken.append(words(*a)) or taken[-1])
    noisy = random_input((37, 300), torch.bfloat16, rng)
    noisy[3, 17], noisy[20, 0], noisy[36, 299] = math.inf, math.nan, -math.inf
    near = (nudged(code_boundaries("fp8_e4m3")[torch.randint(0, 224, (16, 512), generator=rng)], rng)
            * (3.3 / 448)).bfloat16()
    near[5, 7], near[9, 100] = 3e38, -3e38  # finite, and quotients past the guard's 2**17 (even past fp32)
    wide = random_input((40, 402), torch.bfloat16, rng)
    inputs = [random_input((37, 300), torch.bfloat16, rng), noisy, near, every_16bit(torch.bfloat16).reshape(128, 512),
              torch.full((4, 64), math.nan, dtype=torch.bfloat16), torch.zeros(5, 70, dtype=torch.bfloat16),
              wide[:, 2:302], random_input((3, 20, 50), torch.bfloat16, rng)]
    every = (("fp8_e4m3", "fp32", ("own", 3.3 / 448)), ("fp8_e5m2", "fp32", ("own",)))
    some = (("fp8_e4m3", "fp32", ("own", 2.0 ** -100, 3.3 / 448)), ("fp8_e5m2", "fp32", ("own", 2.0 ** 110)),
            ("fp8_e4m3", "pow2", ("stale",)))
    for x in inputs:
        for fmt, encoding, scales in every if x.numel() == 65536 else some:
            spec = QuantSpec(fmt, "tensor", scale_encoding=encoding)
            own = reference.scale_values(reference_quantize(x, spec)).reshape(())
            for scale in scales:
                scale = own if scale == "own" else own * 0.5 if scale == "stale" else torch.tensor(scale)
                taken.clear()
                plans.clear()  # a replayed plan launches without deciding again
                qt, amax = triton_quantize.quantize_with_amax(x.to(device), spec, scale.to(device), config=config)
                assert taken == [True], (x.shape, spec, scale)
                assert_same_qt(to_device(qt, "cpu"), reference_quantize(x, spec, scale))
                assert amax.view(torch.int32).cpu() == reference.amax(x).view(torch.int32), (x, scale)
    spec, wide = QuantSpec(granularity="tensor"), wide.to(device)  # sliced there: .to(device) would copy a slice
    others = [(wide[:, :301], spec), (wide[:, 1:301], spec), (wide.float(), spec), (wide[:, ::2], spec),
              (wide, QuantSpec("int8_sym", "tensor")), (wide, QuantSpec(group_size=2))]
    for x, spec in others:
        taken.clear()
        plans.clear()
        scales = torch.full(spec.scale_shape(x.shape), 0.01)
        qt, amax = triton_quantize.quantize_with_amax(x, spec, scales.to(device), config=config)
        assert not any(taken), (x.shape, x.stride(), spec)
        assert_same_qt(to_device(qt, "cpu"), reference_quantize(x.cpu(), spec, scales))


def test_delayed_words(rng, monkeypatch):
    delayed_words_checks((4, 256, 1), rng, monkeypatch)


def every_16bit(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float dtype, in order of the patterns as int16 (65536 values)."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def code_boundaries(fmt: str) -> torch.Tensor:
    """The quotients at which a code of `fmt` changes (fp8 midpoints, int8 half-integers), exact in fp32."""
    el = QuantSpec(format=fmt).element
    if el.kind == "int":
        return torch.arange(-127, 128, dtype=torch.float32) + 0.5
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(el.code_dtype).float()
    grid = torch.unique(grid[grid.abs() <= el.max])
    return (grid[1:] + grid[:-1]) / 2


def nudged(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with each element moved 0, 1 or 2 ulps up or down at random."""
    steps = torch.randint(-2, 3, x.shape, generator=gen)
    for k in range(2):
        x = torch.where(steps > k, torch.nextafter(x, torch.tensor(float("inf"))), x)
        x = torch.where(steps < -k, torch.nextafter(x, torch.tensor(float("-inf"))), x)
    return x


def near_boundaries(fmt: str, rows: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 rows of 128 whose quotients x / scale fall on or within 2 ulps of the points where a
    code changes (fp8 midpoints, int8 half-integers).

    Each row holds its amax (and, for int8_asym, its negative: zero point 0) so that the scale is
    known; amax exponents span 2**-60 .. 2**60."""
    el = QuantSpec(format=fmt).element
    points = code_boundaries(fmt)
    asym = fmt == "int8_asym"
    out = []
    for _ in range(rows):
        amax = torch.exp2(torch.randint(-60, 61, (), generator=gen).float()) * (1 + torch.rand((), generator=gen))
        scale = 2 * amax / 255 if asym else amax / el.max
        x = nudged(points[torch.randint(0, len(points), (126 if asym else 127,), generator=gen)] * scale, gen)
        head = torch.stack([amax, -amax]) if asym else amax.reshape(1)
        out.append(torch.cat([head, x.clamp(-amax, amax)]))
    return torch.stack(out)


def codes_of_quotients(q: torch.Tensor, qt) -> torch.Tensor:
    """Code bytes the reference's encoder gives fp32 quotients q (one block a row) under qt's format
    and zero points (q / 1 is q)."""
    zp = None if qt.zero_points is None else qt.zero_points.float().reshape(-1, 1)
    values = reference.encode_blocks(q, torch.ones(q.shape[0], 1), zp, qt.spec.element)
    return reference.store_codes(values, qt.spec).view(torch.uint8)


@triton.jit
def _corrected_quotient_kernel(v_ptr, mant_ptr, pow_ptr, bad_ptr, N, BLOCK: tl.constexpr):
    """Per scale (one a program): elements x = v * 2**E whose corrected quotient is not the IEEE one."""
    pid = tl.program_id(0)
    scale = tl.load(mant_ptr + pid) * tl.load(pow_ptr + pid)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(v_ptr + offs, mask=offs < N, other=0.0) * tl.load(pow_ptr + pid)
        want = triton_elements.quotient(x, scale, triton_elements.DIVIDE)
        got = triton_elements.quotient(x, scale, triton_elements.CORRECTED)
        bad += ((got != want) & (tl.abs(want) >= 2.0 ** -20)).to(tl.int32)
    tl.store(bad_ptr + pid, tl.sum(bad))


def corrected_quotient_mismatches(n_scales: int, gen: torch.Generator, device: str = "cpu") -> int:
    """Quotients x / scale where CORRECTED differs from IEEE division (ignoring |q| < 2**-20, coded
    as zero by every format): scales m * 2**E over the exponents CORRECTED is used for, mantissas
    random and the hard ones (all ones, all zeros, one bit); x every bf16 value with |x / 2**E|
    in [2**-21, 2**17) and as many random fp32 ones."""
    bf = every_16bit(torch.bfloat16).float()
    bf = bf[(bf.abs() >= 2.0 ** -21) & (bf.abs() < 2.0 ** 17)]
    rnd = torch.exp2(torch.rand(len(bf), generator=gen) * 38 - 21) * torch.sign(torch.randn(len(bf), generator=gen))
    v = torch.cat([bf, rnd])
    bits = torch.randint(0, 1 << 23, (n_scales,), generator=gen, dtype=torch.int32)
    bits[0::4], bits[1::4] = (1 << 23) - 1, 1
    bits[2::8] = 0
    mant = (bits | 0x3F800000).view(torch.float32)
    pows = torch.exp2(torch.randint(-80, 101, (n_scales,), generator=gen).float())
    bad = torch.zeros(n_scales, dtype=torch.int32, device=device)
    _corrected_quotient_kernel[(n_scales,)](v.to(device), mant.to(device), pows.to(device), bad, len(v), BLOCK=4096)
    return int(bad.sum())


def test_corrected_quotient_is_the_ieee_quotient(rng):
    assert corrected_quotient_mismatches(256, rng) == 0


@pytest.mark.parametrize("fmt", FP8 + ("int8_sym", "int8_asym"))
def test_quotients_near_code_boundaries(fmt, rng):
    """Register blocks divide by the scale as x * RN(1 / scale) corrected by the exact remainder
    (NUMERICS.md). On these inputs the uncorrected product x * RN(1 / scale) gives other codes
    than the IEEE quotient that the reference uses (asserted, so that the test can tell); the
    kernel's codes must be the reference's, for 1 x 128 groups and 128 x 128 tiles alike."""
    x = near_boundaries(fmt, 128, rng)
    spec = QuantSpec(format=fmt)
    want = reference_quantize(x, spec)
    scale = reference.scale_values(want).reshape(-1, 1)
    assert torch.equal(codes_of_quotients(x / scale, want), want.codes.view(torch.uint8).reshape(x.shape))
    assert (codes_of_quotients(x * (1 / scale), want) != want.codes.view(torch.uint8).reshape(x.shape)).sum() > 0
    check(x, spec)
    check(x, QuantSpec(format=fmt, granularity="tile", tile=(128, 128)))


def guarded_quotient_checks(fmt: str, rng, device: str = "cpu") -> None:
    guarded = dataclasses.replace(DEFAULT, guarded_quotient=True)
    x = near_boundaries(fmt, 128, rng)
    spec = QuantSpec(format=fmt)  # 1 x 128 groups: a row a block
    if fmt != "int8_asym":  # given scales (int8_asym takes none)
        scales = reference.scale_values(reference_quantize(x, spec)).reshape(spec.scale_shape(x.shape))
        want = reference_quantize(x, spec, scales)
        assert (codes_of_quotients(x * (1 / scales), want) != want.codes.view(torch.uint8).reshape(x.shape)).sum() > 0
        check(x.to(device), spec, scales.to(device), config=guarded)
        stale = x.clone()
        stale[:4, 1:6] = torch.tensor([math.inf, -math.inf, math.nan, 3e38, -0.0])
        for factor in (1.0, 2.0 ** -20, 2.0 ** -40, 2.0 ** 20):  # exact, saturating, some below CORRECTED_MIN
            check(stale.to(device), spec, (scales * factor).to(device), config=guarded)
    for big in (QuantSpec(fmt, "tensor"), QuantSpec(fmt, group_size=20001), QuantSpec(fmt, "channel", axis=1)):
        check(random_input((6, 300, 200), torch.bfloat16, rng).to(device), big, config=guarded)  # statistics pass
        check((x * 2.0 ** 90).to(device), big, config=guarded)  # scales past CORRECTED_MAX: divided


@pytest.mark.parametrize("fmt", FP8 + ("int8_sym", "int8_asym"))
def test_guarded_quotient_matches_division(fmt, rng):
    """KernelConfig.guarded_quotient: blocks of given scales and of the statistics pass divide by the corrected
    quotient, guarded for Inf, NaN and saturating quotients, and by IEEE division where a tile's scales are
    out of the corrected range; the codes stay the reference's on quotients next to code boundaries (where x
    times the reciprocal alone gives other codes, asserted), under stale scales, and on random inputs."""
    guarded_quotient_checks(fmt, rng)


# (spec, shape) whose register programs can be persistent (one block a program with OneBlock.per_sm,
# INT8 asym row groups with asym_programs); a pow2 tile has no branch around its store. Channels are one
# block a program from 4097 elements a channel.
PERSISTENT_CASES = [(QuantSpec(granularity="tile", tile=(128, 128)), (300, 260)),
                    (QuantSpec(format="fp8_e5m2", granularity="tile", tile=(96, 100)), (300, 260)),
                    (QuantSpec(granularity="tile", tile=(128, 128), scale_encoding="pow2"), (300, 260)),
                    (QuantSpec(format="int8_sym", granularity="channel", axis=0), (7, 4500)),
                    (QuantSpec(format="fp8_e4m3", granularity="channel", axis=0), (7, 4500)),
                    (QuantSpec(format="int8_asym"), (300, 260)),
                    (QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), (300, 260))]


def persistent_launch(x, spec, config) -> bool:
    """Whether quantize(x, spec, config=config) launches persistent programs (quantize_plan.schedule)."""
    (P, R, C), (br, bc) = block_geometry(x.shape, spec)
    asym = spec.format.value == "int8_asym"
    tile, warps = tile_geometry(br, bc, R, C, True, config, asym=asym)
    return schedule(tile, warps, True, False, asym, spec.format.value.startswith("int8"), config).per_sm > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("spec", [QuantSpec(format=f, **kw) for f in ("int8_sym", "int8_asym", "fp8_e4m3")
                                  for kw in ({}, {"granularity": "tile", "tile": (128, 128)},
                                             {"granularity": "channel", "axis": 0})], ids=str)
def test_nan_among_finite_values(spec, device, rng):
    """Blocks whose one special value is NaN (and a row of NaN only) held in registers: NaN's code (int8: 0 or the
    zero point) and scales from the finite values, as the reference. Tiles that are not careful hold finite values
    only (their int8 quotients are rounded without a clamp or a NaN select), so these tiles must be careful."""
    x = random_input((256, 384), torch.bfloat16, rng, edge_cases=False)
    x.view(-1)[torch.randperm(x.numel(), generator=rng)[:40]] = float("nan")
    x[7] = float("nan")
    check(x.to(device), spec)


def test_one_block_schedule_limits_rows_only():
    """128 x 128 tiles run 4 warps without a register limit; rows (channels) take their register limit (float
    rows 80, INT8 rows none)."""
    square, row = Tile(1, 128, 128, 1, 128, 128), Tile(1, 1, 1, 1, 16384, 16384)
    for is_int in (False, True):
        got = schedule(square, 8, True, False, False, is_int, DEFAULT)
        assert got.one_block and (got.warps, got.maxnreg) == (4, None)
    got = schedule(row, 8, True, False, False, False, DEFAULT)
    assert got.one_block and got.warps == 8 and got.maxnreg == DEFAULT.one_block_float.row_maxnreg is not None
    got = schedule(row, 8, True, False, False, True, DEFAULT)
    assert got.one_block and got.warps == 8 and got.maxnreg == DEFAULT.one_block_int.row_maxnreg
    rows_80 = dataclasses.replace(DEFAULT, one_block_int=dataclasses.replace(DEFAULT.one_block_int, row_maxnreg=80))
    assert schedule(row, 8, True, False, False, True, rows_80).maxnreg == 80
    limited = dataclasses.replace(DEFAULT, one_block_int=dataclasses.replace(DEFAULT.one_block_int, maxnreg=128))
    assert schedule(square, 8, True, False, False, True, limited).maxnreg == 128


def test_row_groups_take_the_group_tile():
    """1x128 groups in registers: config.group_tile's elements and warps (INT8 asym: config.asym_tile's);
    None: tile_elems and warps by size."""
    tile, warps = tile_geometry(1, 128, 4096, 4096, True, DEFAULT)
    assert (tile.elems, warps) == (DEFAULT.group_tile[0], DEFAULT.group_tile[1])
    tile, warps = tile_geometry(1, 128, 4096, 4096, True, DEFAULT, asym=True)
    assert (tile.elems, warps) == DEFAULT.asym_tile
    assert tile_geometry(1, 128, 4096, 4096, True, dataclasses.replace(DEFAULT, group_tile=None))[1] == 4


def test_dual_schedule_limits_only_its_tile():
    """dual_warps and dual_maxnreg are chosen for 128 x 128 programs; larger groups keep tile_geometry's
    warps and no register limit (a limit meant for 8 warps would make 16 spill)."""
    small = schedule(Tile(128, 1, 1, 1, 128, 128), 16, True, True, False, False, DEFAULT)
    assert (small.warps, small.maxnreg) == (DEFAULT.dual_warps, DEFAULT.dual_maxnreg)
    large = schedule(Tile(256, 1, 1, 1, 256, 256), 16, True, True, False, False, DEFAULT)
    assert (large.warps, large.maxnreg) == (16, None)


def one_block_config(config=DEFAULT, **fields):
    """`config` with both one-block schedules (float and INT8 formats) changed by `fields` (config.OneBlock; maxnreg
    for blocks of one row too), INT8 asym on them too (bf16 tiles would take the pairs kernel: asym_pairs_launch
    None)."""
    if "maxnreg" in fields:
        fields.setdefault("row_maxnreg", fields["maxnreg"])
    return dataclasses.replace(config, one_block_float=dataclasses.replace(config.one_block_float, **fields),
                               one_block_int=dataclasses.replace(config.one_block_int, **fields),
                               asym_pairs_launch=None)


@pytest.mark.parametrize("spec,shape", PERSISTENT_CASES, ids=str)
def test_persistent_programs(spec, shape, rng):
    """Programs that loop over several tiles (3 programs under the interpreter), careful tiles (Inf,
    NaN) among ordinary ones, quotients next to code boundaries."""
    config = dataclasses.replace(one_block_config(per_sm=1), asym_programs=1)
    x = random_input(shape, torch.bfloat16, rng)
    assert persistent_launch(x, spec, config)
    check(x, spec, config=config)
    check(random_input(shape, torch.float32, rng, edge_cases=False), spec, config=config)
    check(near_boundaries(spec.format.value, 128, rng), spec, config=config)


DEFER_CASES = [(QuantSpec(granularity="tile", tile=(128, 128)), (300, 260)),
               (QuantSpec(granularity="tile", tile=(128, 128), scale_encoding="pow2"), (300, 260)),
               (QuantSpec(format="int8_asym", granularity="tile", tile=(128, 128)), (300, 260)),
               (QuantSpec(format="fp8_e5m2", granularity="channel", axis=0), (7, 4500))]


def deferred_input(shape, dtype, rng) -> torch.Tensor:
    """random_input (Inf, NaN in the first tile) with one more block of subnormals only (a scale outside
    the corrected range) and a NaN in the last block."""
    x = random_input(shape, dtype, rng)
    x[-1, -1] = math.nan
    x[2:5, 130:200] = torch.finfo(dtype).tiny / 8
    return x


@pytest.mark.parametrize("spec,shape", DEFER_CASES, ids=str)
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_deferred_careful_tiles(spec, shape, persistent, defer, rng):
    """OneBlock.defer: one-block programs list their careful tiles (Inf/NaN, extreme scales) for a second
    launch, which must give them the reference's codes and scales; the others are coded in the first.
    Without it, careful tiles are coded in place. Both for float and INT8 formats, whichever is shipped."""
    config = one_block_config(defer=defer, per_sm=1 if persistent else 0)
    check(deferred_input(shape, torch.bfloat16, rng), spec, config=config)
    check(deferred_input(shape, torch.float32, rng), spec, config=config)
    check(random_input(shape, torch.bfloat16, rng, edge_cases=False), spec, config=config)


@pytest.mark.parametrize("spec,shape", DEFER_CASES, ids=str)
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_one_block_divide(spec, shape, defer, rng):
    """KernelConfig.one_block_divide not as shipped (one-block tiles' scales by IEEE division or by the corrected
    steps), careless and careful tiles."""
    config = one_block_config(dataclasses.replace(DEFAULT, one_block_divide=not DEFAULT.one_block_divide), defer=defer)
    check(deferred_input(shape, torch.bfloat16, rng), spec, config=config)
    check(random_input(shape, torch.float32, rng, edge_cases=False), spec, config=config)


# The register tiles' schedules (bf16 inputs would take the pairs kernel: asym_pairs_launch None).
ASYM_GROUP_SCHEDULES = [dict(asym_programs=2, asym_tile=(8192, 8), asym_maxnreg=128, asym_pairs_launch=None),
                        dict(asym_programs=0, asym_pairs_launch=None)]


@pytest.mark.parametrize("schedule_", ASYM_GROUP_SCHEDULES, ids=["persistent", "tile_a_program"])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_int8_asym_groups_deferred(schedule_, defer, rng):
    """KernelConfig.asym_defer: INT8 asym row groups list their careful tiles for a second launch (persistent
    programs or one tile a program), or code them in place."""
    config = dataclasses.replace(DEFAULT, asym_defer=defer, **schedule_)
    spec = QuantSpec(format="int8_asym")
    geometry = tile_geometry(1, 128, 300, 260, True, config, asym=True)
    assert schedule(*geometry, True, False, True, True, config).defer is defer
    for dtype in (torch.bfloat16, torch.float32):
        check(deferred_input((300, 260), dtype, rng), spec, config=config)
    check(random_input((37, 1000), torch.bfloat16, rng, edge_cases=False), spec, config=config)
    check(near_boundaries("int8_asym", 128, rng), spec, config=config)


@triton.jit
def _block_scale_kernel(hi_ptr, nlo_ptr, out_ptr, N, FMT: tl.constexpr, BLOCK: tl.constexpr):
    """Per (hi, nlo) (amax: hi): block_scale's scale and zero point divided and by corrected steps."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    hi = tl.load(hi_ptr + offs, mask=offs < N, other=0.0)
    nlo = tl.load(nlo_ptr + offs, mask=offs < N, other=0.0)
    scale, zp = triton_elements.block_scale(hi, nlo, FMT)
    fast, fast_zp = triton_elements.block_scale(hi, nlo, FMT, triton_elements.CORRECTED_ANY_ZERO)
    tl.store(out_ptr + offs, scale, mask=offs < N)  # (no loop over a tuple: compiled Triton takes only ranges)
    tl.store(out_ptr + N + offs, zp, mask=offs < N)
    tl.store(out_ptr + 2 * N + offs, fast, mask=offs < N)
    tl.store(out_ptr + 3 * N + offs, fast_zp, mask=offs < N)


def block_scales(hi: torch.Tensor, nlo: torch.Tensor, spec: QuantSpec, device: str = "cpu"):
    """(scale, zero point) of block_scale for `spec` by division, then by corrected steps, for each (hi, nlo)."""
    n = len(hi)
    assert len(nlo) == n
    out = torch.empty(4 * n, device=device)
    fmt = element_constants(spec)
    _block_scale_kernel[(triton.cdiv(n, 4096),)](hi.to(device), nlo.to(device), out, n, FMT=fmt, BLOCK=4096)
    return out.cpu().reshape(4, n)


CORRECTED_SCALE_SPECS = [QuantSpec("int8_asym"), QuantSpec("int8_sym"), QuantSpec("fp8_e4m3"), QuantSpec("fp8_e5m2"),
                         QuantSpec(scale_encoding="pow2")]


@pytest.mark.parametrize("spec", CORRECTED_SCALE_SPECS, ids=lambda s: f"{s.format.value}-{s.scale_encoding.value}")
def test_corrected_block_scale(spec, rng):
    """block_scale's corrected steps (no IEEE division, for register tiles that are then checked not to be careful):
    the scale, amax (INT8 asym: the span) over the format's divisor, is the divided one for random mantissas in
    three binades and random values over the whole fp32 range wherever the scale is within the corrected range
    (INT8, whose divisors 127 and 255 gave the IEEE quotient for all 2**31 finite fp32 values, everywhere;
    NUMERICS.md); INT8 asym: an overflowed span gives an infinite scale, and the zero point is the divided one,
    lows whose lo / scale lies on or next to a half-integer included."""
    mantissas = torch.randint(0, 1 << 23, (1 << 18,), generator=rng, dtype=torch.int32)
    binades = [(mantissas | (e + 127) << 23).view(torch.float32) for e in (-60, 0, 90)]
    spans = torch.cat(binades + [torch.exp2(torch.rand(1 << 18, generator=rng) * 254 - 126)])
    share = torch.rand(len(spans), generator=rng)  # hi = span * share, nlo = the rest
    hi = (spans * share).float()
    nlo = spans - hi
    if spec.format.value == "int8_asym":  # lows next to half-integers of lo / scale, where x * RN(1 / scale) errs
        tie_spans = torch.exp2(torch.rand(1 << 12, generator=rng) * 160 - 70)[:, None]
        near = ((torch.arange(255) + 0.5) * (tie_spans / 255)).reshape(-1)
        near = torch.cat([near, torch.nextafter(near, near * 2), torch.nextafter(near, near * 0)])
        tie_spans = tie_spans.expand(-1, 255).reshape(-1).repeat(3)
        tie_hi = tie_spans - near
        fits = (tie_hi >= 0) & (tie_hi + near == tie_spans)
        hi, nlo = torch.cat([hi, tie_hi[fits]]), torch.cat([nlo, near[fits]])
    else:  # amax = hi, and the divisor times powers of two (a pow2 scale's exponent rounds up past those)
        exact = element_constants(spec).DIVISOR * torch.exp2(torch.arange(-100.0, 100.0))
        hi = torch.cat([hi, spans, exact, torch.nextafter(exact, exact * 2), torch.nextafter(exact, exact * 0)])
        nlo = torch.zeros_like(hi)
    scale, zp, fast, fast_zp = block_scales(hi, nlo, spec)
    ok = (scale >= 2.0 ** -80) & (scale <= 2.0 ** 100)
    assert ok.sum() > len(scale) // 2
    if spec.format.value.startswith("int8"):
        assert torch.equal(fast, scale)
    assert torch.equal(fast[ok], scale[ok]) and torch.equal(fast_zp[ok], zp[ok])
    if spec.format.value == "int8_asym":
        big = torch.finfo(torch.float32).max
        _, _, fast, _ = block_scales(torch.tensor([big]), torch.tensor([big]), spec)
        assert fast.item() == math.inf


@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_dual_layout_deferred(fmt, defer, rng):
    """KernelConfig.dual_defer: dual tiles with careful rows or columns (Inf/NaN, a block of subnormals only) are
    listed for a second launch, which codes both layouts of them; tiles careful in one layout only too. Without it
    the first launch codes them in place."""
    config = dataclasses.replace(DEFAULT, dual_defer=defer)
    spec = QuantSpec(format=fmt)
    g = spec.group_size
    x = random_input((3 * g + 5, 2 * g + 3), torch.bfloat16, rng, edge_cases=False)
    tiny = torch.finfo(torch.bfloat16).tiny / 8
    x[1, 1] = math.nan  # tile (0, 0): a careful row and a careful column
    x[g + 2, g:2 * g] = tiny  # tile (1, 1): a careful row only (a block of subnormals), its columns ordinary
    x[2 * g:3 * g, 3] = tiny  # tile (2, 0): a careful column only
    x[g + 2:g + 6, 2 * g + 1] = math.inf  # tile (1, 2), ragged: careful columns and rows
    for t in (x, deferred_input((300, 260), torch.float32, rng)):
        check_dual(t, spec, config=config)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8_asym", "mxfp8"])
@pytest.mark.parametrize("slabs", [1, 2, 4])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
def test_dual_layout_slabs(fmt, slabs, defer, prefetch, rng):
    """KernelConfig.dual_slabs and dual_slabs_mx_asym (the other dual tests take the defaults): dual programs take
    their tile's rows, then its columns, a slab at a time, or the whole tile (1); careful rows and columns in some
    slabs only, ragged tiles, 1x32 groups several a row. KernelConfig.dual_prefetch and dual_prefetch_mx: each slab
    loaded while the one before is coded, or after it."""
    config = dataclasses.replace(DEFAULT, dual_slabs=slabs, dual_slabs_mx_asym=slabs, dual_defer=defer,
                                 dual_prefetch=prefetch, dual_prefetch_mx=prefetch)
    for g in (32,) if fmt == "mxfp8" else (128, 32):
        spec = QuantSpec(format=fmt, group_size=g)
        x = random_input((2 * g + 5, 3 * g + 3), torch.bfloat16, rng, edge_cases=False)
        x[g + 2, 5] = math.nan  # tile (1, 0): one careful row, one careful column, in one slab each
        x[3, 2 * g + 1:2 * g + 4] = torch.finfo(torch.bfloat16).tiny / 8
        check_dual(x, spec, config=config)


# The dual plans not shipped (KernelConfig's: columns across lanes, the late careful check, X^T's codes in words,
# MX columns on (2, 4) lanes without the register prefetch), DUAL_PLAN_H100 among them; the other dual tests take
# the shipped one.
DUAL_PLANS = [dict(dual_column_lanes=None, dual_late_check=False), dict(dual_column_lanes=None),
              dict(dual_late_check=False), dict(dual_column_lanes=(8, 32)), dict(dual_column_lanes=(16, 4)),
              dict(dual_prefetch_mx=True), DUAL_PLAN_H100]


def fields_id(fields: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in fields.items()) or "shipped"


def dual_plan_inputs(fmt: str) -> list:
    """(group size, rows of the careful input, shape of the input checked transposed) for each spec test_dual_plans
    checks: dual_plan_cases compares the launches of these row counts (the transposed input's: its shape[1])."""
    return [(g, 2 * g + 5, (3 * g + 1, 2 * g + 7)) for g in ((32,) if fmt == "mxfp8" else (128, 32))]


def dual_plan_cases() -> list:
    """(fmt, plan, defer) of test_dual_plans, each launch once: a case is left out where the launches it makes (the
    DUAL_PLAN of each input it checks, under the interpreter; in place dual_late_check does nothing) are the shipped
    plan's, which the other dual tests run, or those of a case before it. Left out so: dual_prefetch_mx and
    dual_column_lanes_mx outside MX, dual_column_lanes in MX, dual_row_words (no row count below is a multiple of 4)."""
    cases, seen = [], set()
    for fmt in ("fp8_e4m3", "int8_asym", "mxfp8"):
        for defer in (False, True):
            for plan in ({}, *DUAL_PLANS):
                config = dataclasses.replace(DEFAULT, dual_defer=defer, **plan)
                launches = tuple(triton_quantize.dual_plan(QuantSpec(format=fmt, group_size=g), config, r)
                                 ._replace(LATE=defer and config.dual_late_check)
                                 for g, rows, shape in dual_plan_inputs(fmt) for r in (rows, shape[1]))
                if (fmt, defer, launches) not in seen and plan:
                    cases.append((fmt, plan, defer))
                seen.add((fmt, defer, launches))
    return cases


DUAL_PLAN_CASES = dual_plan_cases()


@pytest.mark.parametrize("fmt, plan, defer", DUAL_PLAN_CASES,
                         ids=[f"{'deferred' if defer else 'careful_in_place'}-{fields_id(plan)}-{fmt}"
                              for fmt, plan, defer in DUAL_PLAN_CASES])
def test_dual_plans(fmt, plan, defer, rng):
    """KernelConfig.dual_column_lanes: the columns' slabs loaded as (columns a thread, rows across lanes), viewed
    with their first axes swapped and stored swapped back; dual_late_check: careful tiles found once a tile, every
    slab first coded as if careless (deferred; in place it does nothing). Careful rows and columns, ragged tiles,
    1x128 and 1x32 groups, a transposed input (its column stride not 1). Each distinct launch once
    (dual_plan_cases)."""
    config = dataclasses.replace(DEFAULT, dual_defer=defer, **plan)
    for g, rows, shape in dual_plan_inputs(fmt):
        spec = QuantSpec(format=fmt, group_size=g)
        check_dual(careful_dual_input(g, rows, rng), spec, config=config)
        check_dual(random_input(shape, torch.float32, rng).T, spec, config=config)


@pytest.mark.parametrize("setting, prefetching", [(DEFAULT.dual_l2_prefetch, {"fp8_e4m3", "fp8_e5m2"}),
                                                  (True, set(DUAL_FORMATS)), (False, set()), (("mxfp8",), {"mxfp8"})])
def test_dual_l2_prefetch_formats(setting, prefetching, monkeypatch):
    """KernelConfig.dual_l2_prefetch: every format, none, or those a tuple names (shipped: the fp8 formats); compiled
    kernels only (the interpreter runs no PTX)."""
    config = dataclasses.replace(DEFAULT, dual_l2_prefetch=setting)
    monkeypatch.setattr(triton_quantize, "interpreting", lambda: True)
    assert not any(triton_quantize.dual_plan(QuantSpec(format=f), config, 256).L2 for f in DUAL_FORMATS)
    monkeypatch.setattr(triton_quantize, "interpreting", lambda: False)
    assert {f for f in DUAL_FORMATS if triton_quantize.dual_plan(QuantSpec(format=f), config, 256).L2} == prefetching


def careful_dual_input(g, rows, rng):
    """(rows, 3g + 3) bf16, rows > 2g + 1, for dual tiles of g x g: a NaN (a careful row and a careful column), a run
    of subnormals in a row, a careful row alone in the tile's last rows' slab, a careful column alone past the first
    columns' slab where g = 128, and a value that saturates its column's codes."""
    tiny = torch.finfo(torch.bfloat16).tiny / 8
    x = random_input((rows, 3 * g + 3), torch.bfloat16, rng, edge_cases=False)
    x[g + 2, 5] = math.nan
    x[3, 2 * g + 1:2 * g + 4] = tiny
    x[g - 1, :g] = tiny
    x[:g, 5 * g // 2 + 1] = tiny
    x[2 * g + 1, 7] = 1e30
    return x


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8"])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_dual_row_words(fmt, defer, rng):
    """KernelConfig.dual_row_words: X^T's fp8 codes made and stored four rows to a word where X has a multiple of 4
    rows (the interpreter takes encode_float's integer path, the GPU test the hardware's): careful rows and columns,
    ragged tiles both ways, 1x128 and 1x32 groups; 4 rows (one word a column); a row count that is not a multiple
    of 4 (the bytes' path)."""
    for lanes in [(2, 8), (2, 4)] if fmt == "mxfp8" else [(2, 8)]:  # KernelConfig.dual_column_lanes_mx too
        config = dataclasses.replace(DEFAULT, dual_defer=defer, dual_row_words=True, dual_column_lanes_mx=lanes)
        check_dual_row_words(fmt, config, rng, "cpu")


def check_dual_row_words(fmt, config, rng, device):
    for g in (32,) if fmt == "mxfp8" else (128, 32):
        spec = QuantSpec(format=fmt, group_size=g)
        check_dual(careful_dual_input(g, 2 * g + 4, rng).to(device), spec, config=config)
        check_dual(random_input((4, 2 * g + 1), torch.float32, rng).to(device), spec, config=config)
        check_dual(random_input((g + 6, g), torch.bfloat16, rng).to(device), spec, config=config)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(format="int8_asym"), QuantSpec(format="mxfp8"),
                                  QuantSpec(granularity="tile", tile=(128, 128)), QuantSpec(granularity="tensor")],
                         ids=lambda s: s.describe())
def test_bf16_widened_on_its_bits_as_compiled(spec, rng, monkeypatch):
    """load_fp32's compiled path for bf16 (the loaded values widened on their bits), which the interpreter otherwise
    never takes (it is handed int16 views: its bf16 cast drops subnormals): the reference's codes, subnormals and
    specials included, for the register, statistics and dual kernels."""
    for module in (quantize_plan, triton_quantize, triton_block_stats):
        monkeypatch.setattr(module, "bf16_bits", lambda x: False)
    plans.clear()  # no launch recorded with int16 views is replayed
    try:
        x = random_input((300, 260), torch.bfloat16, rng)
        x[5, :130] = torch.finfo(torch.bfloat16).tiny / 4
        check(x, spec, config=dataclasses.replace(DEFAULT, asym_pairs_launch=None))  # INT8 asym: the register tiles
        if spec.granularity == Granularity.GROUP:
            check_dual(x, spec)
    finally:
        plans.clear()


def every_bf16_under_scales(exponents) -> torch.Tensor:
    """(rows, 32) bf16: MX blocks of the scale 2**e for each e in `exponents` (a leading 2**(e + 2)
    sets the amax), the other 31 elements every finite bf16 value below 2**(e + 3), padded with
    zeros."""
    finite = every_16bit(torch.bfloat16).float()
    finite = finite[finite.abs() < math.inf]
    rows = []
    for e in exponents:
        vals = finite[finite.abs() < 2.0 ** (e + 3)]
        vals = torch.cat([vals, vals.new_zeros(-len(vals) % 31)]).reshape(-1, 31)
        rows.append(torch.cat([torch.full((len(vals), 1), 2.0 ** (e + 2)), vals], dim=1))
    return torch.cat(rows).to(torch.bfloat16)


def test_mxfp4_bf16_under_chosen_scales():
    """Every finite bf16 value under the E8M0 scales at both ends of the range and around 1 (as the
    GPU test does for every scale); the pairs kernel's integer amax and scale exponent."""
    x = every_bf16_under_scales([-127, -126, -2, 0, 1, 125])
    check(x, QuantSpec(format="mxfp4"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_e2m1_bf16_pairs_every_bf16_under_every_scale(device):
    """triton_mxfp4_pairs._e2m1_bf16_pairs (PTX: compiled, or its model under the interpreter) on every finite
    bf16 value in both halves of a word (the high ones shuffled) under every scale 2**e, e in [-127, 127]: the
    reference's codes of the exact quotients clamped to +-6, as the reference clamps before encoding."""

    @triton.jit
    def encode(w_ptr, out_ptr, n, e, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        code = triton_mxfp4_pairs._e2m1_bf16_pairs(tl.load(w_ptr + i, mask=m, other=0), e)
        tl.store(out_ptr + i, code.to(tl.uint8), mask=m)

    bits = torch.arange(1 << 16, dtype=torch.int32)
    finite = bits[torch.isfinite(bits.to(torch.int16).view(torch.bfloat16))]
    gen = torch.Generator().manual_seed(3)
    lo, hi = finite, finite[torch.randperm(finite.numel(), generator=gen)]
    w = (lo | (hi << 16)).to(device)
    as_fp32 = lambda h: h.to(torch.int16).view(torch.bfloat16).float()  # noqa: E731
    out = torch.empty(w.shape, dtype=torch.uint8, device=device)
    for e in range(-127, 128):
        encode[(triton.cdiv(w.numel(), 16384),)](w, out, w.numel(), e, BLOCK=16384)
        want = [reference.e2m1_codes((as_fp32(h) * 2.0 ** -e).clamp(-6.0, 6.0)) for h in (lo, hi)]
        assert torch.equal(out.cpu(), want[0] | (want[1] << 4)), e


@pytest.mark.parametrize("fmt", FP8 + ("mxfp4", "nvfp4"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_input(fmt, dtype):
    """Every bf16/fp16 bit pattern through the encoder, at unit scale and with scales from the data."""
    x = every_16bit(dtype).reshape(256, 256)
    if fmt in ("mxfp4", "nvfp4"):
        check(x, QuantSpec(format=fmt))
        return
    check(x, QuantSpec(format=fmt, granularity="tensor"), torch.ones(()))
    check(x, QuantSpec(format=fmt, group_size=64))


def every_bf16_under_scales_across_fp32(fmt, gen, device="cpu"):
    """Every bf16 value (one row of 128 a group) under explicit fp32 scales whose exponents span
    fp32: subnormal scales, tiny and huge ones, so that quotients cover every code, underflow
    and overflow."""
    x = every_16bit(torch.bfloat16).reshape(512, 128)
    spec = QuantSpec(format=fmt, group_size=128)
    exponents = torch.cat([torch.tensor([[-149.0], [-127.0], [-31.0], [60.0], [127.0]]),
                           torch.randint(-149, 128, (507, 1), generator=gen).float()])
    scales = torch.exp2(exponents) * (1 + torch.rand(512, 1, generator=gen))
    scales = torch.where(torch.isfinite(scales), scales, torch.finfo(torch.float32).max)
    check(x.to(device), spec, scales.to(device))


@pytest.mark.parametrize("fmt", FP8 + ("int8_sym",))
def test_quotient_across_fp32_range(fmt, rng):
    every_bf16_under_scales_across_fp32(fmt, rng)


def pairs_taken(monkeypatch, name: str) -> list:
    """Whether each quantize call took triton_quantize's pairs kernel `name` (mxfp4_pairs, asym_pairs), in order;
    launch plans off, so that each call runs its body."""
    monkeypatch.setenv("QUANTD_PLANS", "0")
    taken = []
    pairs = getattr(triton_quantize, name)
    monkeypatch.setattr(triton_quantize, name, lambda *a: taken.append(pairs(*a)) or taken[-1])
    return taken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mxfp4_pairs_kernel(dtype, rng, monkeypatch):
    """16-bit MXFP4 inputs whose rows can be read as int32 pairs take _mxfp4_pairs_kernel (ragged last
    block, sliced rows, column scales); others (odd width, strided columns, fp32) the generic kernel."""
    taken = pairs_taken(monkeypatch, "mxfp4_pairs")
    spec = QuantSpec(format="mxfp4")
    x = random_input((70, 400), dtype, rng)
    for t in (x, x[3:50, 16:316], x[:, :301], x[:, ::2], x.float()):
        check(t, spec)
    got = dispatch.quantize(x, spec, backend="triton", scale_layout="col")
    assert_same_qt(got, reference_quantize(x, spec))
    assert taken == [True, True, False, False, False, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("group", [128, 32])
def test_asym_pairs_kernel(group, device, rng, monkeypatch):
    """bf16 INT8 asym row groups whose rows can be read as int32 pairs take _asym_pairs_kernel (careless tiles,
    careful ones: NaN, Inf, subnormal rows; a ragged last block, sliced rows, column scales, a program of two warps
    and of several rows, pieces of 4 words); others (odd width, strided columns, fp16, groups wider than a program,
    the pairs off) the register tiles."""
    taken = pairs_taken(monkeypatch, "asym_pairs")
    spec = QuantSpec(format="int8_asym", group_size=group)
    x = random_input((70, 400), torch.bfloat16, rng).to(device)
    plain = random_input((40, 512), torch.bfloat16, rng, edge_cases=False).to(device)
    plain[3, 64:96] = -plain[3, 64:96].abs()  # a block of negatives only
    plain[5, :group] = torch.finfo(torch.bfloat16).max  # +-max: a span that overflows fp32 (careful)
    plain[5, group - 1] = -torch.finfo(torch.bfloat16).max
    for (i, j), v in zip([(7, 33), (8, 34), (9, 3), (10, 2), (11, 5), (12, 4), (13, 6)],
                         [math.nan, -math.nan, math.inf, math.inf, -math.inf, -math.inf, 2.0 ** -133]):
        plain[i, j] = v  # careful tiles: each special in an even and an odd element
    for t in (x, plain, x[3:50, 16:316], x[:, :301], x[:, ::2], x.half()):
        check(t, spec)
    check(plain, spec, config=dataclasses.replace(DEFAULT, asym_pairs_launch=(256, 2)))
    check(plain, spec, config=dataclasses.replace(DEFAULT, asym_pairs_launch=(group // 2, 1)))
    check(plain, spec, config=dataclasses.replace(DEFAULT, asym_pairs_piece=4))
    check(plain, spec, config=dataclasses.replace(DEFAULT, asym_pairs_launch=None))
    got = dispatch.quantize(x, spec, backend="triton", scale_layout="col")
    assert_same_qt(got, reference_quantize(x, spec))
    assert taken == [True, True, True, False, False, False, True, False, True, False, True]
    if device == "cuda":  # many tiles, careless and careful
        check(random_input((1000, 4096), torch.bfloat16, rng).to(device), spec)
        check(random_input((3000, 2048), torch.bfloat16, rng, edge_cases=False).to(device), spec)
        check(every_16bit(torch.bfloat16).reshape(256, 256).to(device), spec)
        check(near_boundaries("int8_asym", group, rng).to(device), spec)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tile", [(128, 128), (4, 64), (32, 32)], ids=str)
def test_asym_pairs_kernel_tiles(tile, device, rng, monkeypatch):
    """KernelConfig.asym_pairs_tile_elems set: bf16 INT8 asym 2-D tiles whose rows can be read as int32 pairs take
    _asym_pairs_kernel, a tile row a program (careless tiles; careful ones: NaN, Inf, subnormals, a span that
    overflows fp32; ragged last tiles in both directions, sliced rows, column scales, tiles of one sign); others
    (odd width, strided columns, fp16, fp32, the pairs off, the knob off) the register tiles."""
    taken = pairs_taken(monkeypatch, "asym_pairs")
    spec = QuantSpec(format="int8_asym", granularity="tile", tile=tile)
    on = dataclasses.replace(DEFAULT, asym_pairs_tile_elems=64)
    br, bc = tile
    x = random_input((br + 3, bc + 6), torch.bfloat16, rng).to(device)
    plain = random_input((2 * br, 2 * bc), torch.bfloat16, rng, edge_cases=False).to(device)
    plain[1, 3], plain[br - 1, bc - 2] = math.nan, math.inf  # careful
    plain[:br, bc:] = -plain[:br, bc:].abs()  # a tile of negatives only
    plain[br:, :bc] = torch.finfo(torch.bfloat16).max  # +-max: a span that overflows fp32 (careful)
    plain[-1, bc - 1] = -torch.finfo(torch.bfloat16).max
    plain[br:, bc:] *= 2.0 ** -130  # subnormals: a scale below the corrected range (careful)
    for t in (x, plain, x[3:, 2:bc + 2], x[:, :bc + 1], x[:, ::2], x.half(), x.float()):
        check(t, spec, config=on)
    variants = br * bc < 16384 or device == "cuda"  # (the interpreter's reductions of 128 x 128 tiles are slow)
    if variants:  # more warps; pieces of 4 words
        check(plain, spec, config=dataclasses.replace(on, asym_pairs_tile_elems=16))
        check(plain, spec, config=dataclasses.replace(on, asym_pairs_piece=4))
    check(plain, spec, config=dataclasses.replace(on, asym_pairs_launch=None))
    check(plain, spec, config=dataclasses.replace(on, asym_pairs_tile_elems=None))  # the register tiles
    check(plain, spec)  # as shipped
    got = dispatch.quantize(x, spec, backend="triton", scale_layout="col", config=on)
    assert_same_qt(got, reference_quantize(x, spec))
    assert taken == ([True, True, True, False, False, False, False] + [True, True] * variants
                     + [False, False, True, True])
    if device == "cuda":  # many tiles, careless and careful
        check(random_input((1000, 4096), torch.bfloat16, rng).to(device), spec, config=on)
        check(random_input((4096, 2048), torch.bfloat16, rng, edge_cases=False).to(device), spec, config=on)
        check(every_16bit(torch.bfloat16).reshape(256, 256).to(device), spec, config=on)
        check(near_boundaries("int8_asym", bc, rng)[:br * (1024 // br)].to(device), spec, config=on)


def test_scale_layouts(rng):
    x = random_input((37, 300), torch.bfloat16, rng)
    for spec in (QuantSpec(), QuantSpec(format="int8_asym"), QuantSpec(format="mxfp4"),
                 QuantSpec(granularity="tile", tile=(16, 128))):
        want = reference_quantize(x, spec)
        for backend in ("triton", "reference"):
            got = dispatch.quantize(x, spec, backend=backend, scale_layout="col")
            assert got.scales.stride()[-1] == got.scales.shape[0] and got.scales.stride()[0] == 1
            assert_same_qt(got, want)
            assert torch.equal(dispatch.dequantize(got, backend="reference").view(torch.int16),
                               reference.dequantize(want).view(torch.int16))


@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("shape", [(256, 384), (200, 130)], ids=str)
def test_dual_layout(fmt, shape, rng):
    spec = QuantSpec(format=fmt)
    x = random_input(shape, torch.bfloat16, rng)
    rows, cols = quantize_dual(x, spec)
    want_rows, want_cols = dispatch.quantize_dual(x, spec, backend="reference")
    assert_same_qt(rows, want_rows)
    assert_same_qt(cols, want_cols)
    assert_same_qt(cols, reference_quantize(x.T.contiguous(), spec))


def test_dual_through_dispatch_col_scales(rng):
    x = random_input((128, 256), torch.float16, rng)
    spec = QuantSpec(scale_encoding="pow2")
    rows, cols = dispatch.quantize_dual(x, spec, backend="triton", scale_layout="col")
    assert cols.scales.stride() == (1, cols.scales.shape[0])
    assert_same_qt(rows, reference_quantize(x, spec))
    assert_same_qt(cols, reference_quantize(x.T.contiguous(), spec))


def test_bad_input():
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match="dtype"):
        quantize(x.to(torch.int32), QuantSpec())
    with pytest.raises(ValueError, match="scales must have shape"):
        quantize(x, QuantSpec(), torch.ones(3))
    with pytest.raises(ValueError, match="int8_asym"):
        quantize(x, QuantSpec(format="int8_asym"), torch.ones(4, 2))
    with pytest.raises(ValueError, match="scale_layout"):
        quantize(x, QuantSpec(), scale_layout="diagonal")
    with pytest.raises(ValueError, match="power-of-two"):
        quantize_dual(x, QuantSpec(group_size=100))
    with pytest.raises(ValueError, match="two codes a byte"):
        quantize_dual(x, QuantSpec(format="mxfp4"))
    with pytest.raises(ValueError, match="2-D"):
        quantize_dual(x.reshape(2, 2, 256), QuantSpec())


def test_empty_input():
    """Empty tensors follow the reference (which handles an empty last dim)."""
    check(torch.empty(4, 0), QuantSpec())


# ---- GPU: compiled kernels, CUDA tensors --------------------------------------------------

GPU_SHAPES = [(1, 1), (3, 129), (127, 257), (1024, 4096), (4097, 1000)]
LARGE_SPECS = [QuantSpec(), QuantSpec(granularity="tile", tile=(128, 128)), QuantSpec(format="mxfp8"),
               QuantSpec(format="mxfp4"), QuantSpec(format="int8_sym"), QuantSpec(format="int8_asym"),
               QuantSpec(format="fp8_e5m2", granularity="tensor"), QuantSpec(granularity="channel", axis=-1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_gpu_matches_reference(spec, dtype, rng):
    """Compiled kernels (hardware fp8 cast) on fresh inputs of many shapes; every spec in
    bf16, the 1x128-group, per-tensor and MX specs in every input dtype."""
    if dtype != torch.bfloat16 and not spec.is_mx and spec.granularity.value not in ("group", "tensor"):
        pytest.skip("other input dtypes are covered on the group, tensor and MX specs")
    for shape in GPU_SHAPES:
        check(random_input(shape, dtype, rng).cuda(), spec)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FP8 + ("int8_sym", "int8_asym"))
def test_gpu_guarded_quotient_matches_division(fmt, rng):
    guarded_quotient_checks(fmt, rng, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", STATIC_SPECS, ids=str)
def test_gpu_amax_found_while_quantizing_with_given_scales(spec, rng):
    for shape in GPU_SHAPES:
        x = random_input(shape, torch.bfloat16, rng).cuda()
        scales = torch.exp2(torch.round(torch.randn(spec.scale_shape(x.shape), generator=rng) * 4)).cuda()
        qt, amax = dispatch.quantize_with_amax(x, spec, scales=scales)
        assert_same_qt(qt, reference_quantize(x, spec, scales))
        assert amax.device == x.device and amax.cpu().view(torch.int32) == reference.amax(x.cpu()).view(torch.int32)
        # scales on the host (as a request carries them): checked there, the same bits; bad ones refused
        host, host_amax = dispatch.quantize_with_amax(x, spec, scales=scales.cpu())
        assert_same_qt(host, qt)
        assert host_amax.device == x.device and torch.equal(host_amax.view(torch.int32), amax.view(torch.int32))
        with pytest.raises(ValueError, match="positive and finite"):
            quantize(x, spec, -scales.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [s for i, s in SPECS if i.startswith("fp8")],
                         ids=[i for i in SPEC_IDS if i.startswith("fp8")])
def test_gpu_exact_fp8_path(spec, rng):
    """The interpreter's integer fp8 encoding, compiled, agrees too."""
    for shape in GPU_SHAPES[2:]:
        check(random_input(shape, torch.bfloat16, rng).cuda(), spec, exact_fp8=True)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,shape", PERSISTENT_CASES, ids=str)
@pytest.mark.parametrize("per_sm", [0, 1], ids=["tile_a_program", "persistent"])
def test_gpu_persistent_programs(spec, shape, per_sm, rng):
    """One-block programs, one tile a program or persistent, over ragged and aligned shapes, with and without
    Inf/NaN, and every bf16."""
    config = dataclasses.replace(one_block_config(per_sm=per_sm), asym_programs=per_sm)
    for size in GPU_SHAPES[2:] + [shape, (129, 129), (1000, 3), (513, 129), (70, 9000)]:
        check(random_input(size, torch.bfloat16, rng).cuda(), spec, config=config)
        check(random_input(size, torch.float32, rng, edge_cases=False).cuda(), spec, config=config)
    check(near_boundaries(spec.format.value, 128, rng).cuda(), spec, config=config)
    check(every_16bit(torch.bfloat16).reshape(256, 256).cuda(), spec, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,shape", DEFER_CASES, ids=str)
@pytest.mark.parametrize("warps,programs,maxnreg", [(None, 1, None), (8, 0, 128), (None, 0, 64), (32, 0, None)])
def test_gpu_deferred_careful_tiles(spec, shape, warps, programs, maxnreg, rng):
    """The deferred careful tiles (OneBlock.defer) under the launch settings quantize.py --sweep times."""
    config = one_block_config(dataclasses.replace(DEFAULT, tile_warps=warps, tile_maxnreg=maxnreg), defer=True,
                              per_sm=programs)
    for size in [shape, (129, 129), (513, 1000), (2048, 8192)]:
        check(deferred_input(size, torch.bfloat16, rng).cuda(), spec, config=config)
        check(random_input(size, torch.float32, rng, edge_cases=False).cuda(), spec, config=config)
    check(every_16bit(torch.bfloat16).reshape(256, 256).cuda(), spec, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,shape", DEFER_CASES, ids=str)
def test_gpu_one_block_divide(spec, shape, rng):
    config = dataclasses.replace(DEFAULT, one_block_divide=not DEFAULT.one_block_divide)
    for size in [shape, (129, 129), (2048, 8192)]:
        check(deferred_input(size, torch.bfloat16, rng).cuda(), spec, config=config)
        check(random_input(size, torch.float32, rng, edge_cases=False).cuda(), spec, config=config)
    check(every_16bit(torch.bfloat16).reshape(256, 256).cuda(), spec, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule_", ASYM_GROUP_SCHEDULES, ids=["persistent", "tile_a_program"])
def test_gpu_int8_asym_groups_deferred(schedule_, rng):
    config = dataclasses.replace(DEFAULT, asym_defer=True, **schedule_)
    spec = QuantSpec(format="int8_asym")
    for size in [(300, 260), (129, 129), (513, 1000), (2048, 8192)]:
        check(deferred_input(size, torch.bfloat16, rng).cuda(), spec, config=config)
        check(random_input(size, torch.float32, rng, edge_cases=False).cuda(), spec, config=config)
    check(every_16bit(torch.bfloat16).reshape(256, 256).cuda(), spec, config=config)
    check(near_boundaries("int8_asym", 128, rng).cuda(), spec, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ("fp8_e4m3", "fp8_e5m2", "int8_sym"))
def test_gpu_guarded_delayed(fmt, rng):
    guarded_delayed_checks(fmt, rng, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [(1, 512, 1), (1, 1024, 1), (1, 1024, 2), (2, 128, 1), (4, 256, 4)], ids=str)
def test_gpu_delayed_words(launch, rng, monkeypatch):
    """Delayed scaling from bf16 words compiled (the hardware's pair conversions, max.u16x2) at several launches, on
    the inputs of delayed_words_checks and a large random one."""
    delayed_words_checks(launch, rng, monkeypatch, "cuda")
    x = random_input((1000, 8192), torch.bfloat16, rng).cuda()
    spec, scale = QuantSpec(granularity="tensor"), torch.tensor(0.02, device="cuda")
    config = dataclasses.replace(DEFAULT, delayed_words=launch)
    qt, amax = triton_quantize.quantize_with_amax(x, spec, scale, config=config)
    assert_same_qt(to_device(qt, "cpu"), reference_quantize(x.cpu(), spec, scale.cpu()))
    assert amax.view(torch.int32).cpu() == reference.amax(x.cpu()).view(torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("lookup_tile", [(16384, 4), (8192, 4), (2048, 1), (16384, 8), None], ids=str)
def test_gpu_lookup_tiles(lookup_tile, rng):
    config = dataclasses.replace(DEFAULT, lookup_tile=lookup_tile, lookup_tile_amax=lookup_tile)
    lookup_tile_checks(random_input((2048, 8192), torch.bfloat16, rng), config, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", CORRECTED_SCALE_SPECS, ids=lambda s: f"{s.format.value}-{s.scale_encoding.value}")
def test_gpu_corrected_block_scale(spec):
    """block_scale's corrected scales compiled: every mantissa of six binades, against div.rn."""
    mantissas = torch.arange(1 << 23, dtype=torch.int32)
    spans = torch.cat([(mantissas | (e + 127) << 23).view(torch.float32) for e in (-126, -72, -8, 0, 30, 126)])
    scale, _, fast, _ = block_scales(spans / 2, spans - spans / 2, spec, "cuda")
    ok = (scale >= 2.0 ** -80) & (scale <= 2.0 ** 100)
    assert torch.equal(fast[ok], scale[ok])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_gpu_dual_layout_deferred(fmt, warps, defer, rng):
    config = dataclasses.replace(DEFAULT, dual_defer=defer, dual_warps=warps)
    spec = QuantSpec(format=fmt)
    for size in [(128, 128), (1000, 3000), (4096, 8192)]:
        check_dual(deferred_input(size, torch.bfloat16, rng).cuda(), spec, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("slabs", [1, 2, 4])
@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
def test_gpu_dual_layout_slabs(fmt, slabs, prefetch, rng):
    config = dataclasses.replace(DEFAULT, dual_slabs=slabs, dual_slabs_mx_asym=slabs, dual_prefetch=prefetch,
                                 dual_prefetch_mx=prefetch)
    for size in [(128, 128), (1000, 3000), (4096, 8192)]:
        check_dual(deferred_input(size, torch.bfloat16, rng).cuda(), QuantSpec(format=fmt), config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("plan", [{}] + DUAL_PLANS + [dict(dual_column_lanes=(4, 16)), dict(dual_l2_prefetch=True),
                                  dict(dual_l2_prefetch=True, dual_prefetch=False),
                                  dict(dual_l2_prefetch=True, dual_prefetch=False, dual_row_words=True),
                                  dict(dual_l2_prefetch=False)], ids=fields_id)
def test_gpu_dual_plans(fmt, plan, rng):
    config = dataclasses.replace(DEFAULT, **plan)
    for size in [(128, 128), (1000, 3000), (2304, 1536)]:
        check_dual(deferred_input(size, torch.bfloat16, rng).cuda(), QuantSpec(format=fmt), config=config)
    check_dual(random_input((3000, 1000), torch.bfloat16, rng).cuda().T, QuantSpec(format=fmt), config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8"])
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
def test_gpu_dual_row_words(fmt, defer, rng):
    for lanes in [(2, 8), (2, 4)] if fmt == "mxfp8" else [(2, 8)]:
        config = dataclasses.replace(DEFAULT, dual_defer=defer, dual_row_words=True, dual_column_lanes_mx=lanes)
        check_dual_row_words(fmt, config, rng, "cuda")
        for size in [(4096, 8192), (1000, 3000)]:
            check_dual(deferred_input(size, torch.bfloat16, rng).cuda(), QuantSpec(format=fmt), config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("defer", [False, True], ids=["careful_in_place", "deferred"])
@pytest.mark.parametrize("plan", [{}, DUAL_PLAN_H100], ids=["shipped", "h100"])
def test_gpu_dual_plan(fmt, defer, plan, rng):
    """The shipped dual plan and DUAL_PLAN_H100: the row words' cases (check_dual_row_words), random and careful
    tiles at the shapes of test_gpu_dual_layout, a transposed input."""
    config = dataclasses.replace(DEFAULT, dual_defer=defer, **plan)
    check_dual_row_words(fmt, config, rng, "cuda")
    spec = QuantSpec(format=fmt)
    for shape in [(128, 128), (1000, 3000), (4096, 8192)]:
        check_dual(random_input(shape, torch.bfloat16, rng).cuda(), spec, config=config)
        check_dual(deferred_input(shape, torch.bfloat16, rng).cuda(), spec, config=config)
    check_dual(random_input((3000, 1000), torch.bfloat16, rng).cuda().T, spec, config=config)


@pytest.mark.gpu
def test_gpu_corrected_quotient_is_the_ieee_quotient(rng):
    """The compiled fmas, on 2**16 scales (~1.6e9 quotients)."""
    assert corrected_quotient_mismatches(1 << 16, rng, "cuda") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("spec", LARGE_SPECS, ids=str)
def test_gpu_large(spec, rng):
    check(random_input((16384, 4096), torch.bfloat16, rng).cuda(), spec)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [s for _, s in SPECS], ids=SPEC_IDS)
def test_gpu_shapes_and_strides(spec, rng):
    check(random_input((3, 20, 50), torch.bfloat16, rng).cuda(), spec)
    check(random_input((100000,), torch.float16, rng).cuda(), spec)
    check(random_input((1600, 700), torch.float32, rng).cuda().T, spec)
    check(random_input((400, 4000), torch.bfloat16, rng).cuda()[::3, 7:3900:2], spec)
    check(torch.zeros(5, 700, device="cuda"), spec)


@pytest.mark.gpu
def test_gpu_mxfp4_bf16_under_every_scale():
    """The packed bf16x2 E2M1 encoder (compiled only): every finite bf16 value under every E8M0 scale
    its block can have (~8.6M elements)."""
    check(every_bf16_under_scales(range(-127, 126)).cuda(), QuantSpec(format="mxfp4"))


@pytest.mark.gpu
@pytest.mark.parametrize("exact_fp8", [False, True], ids=["hw_cast", "exact"])
@pytest.mark.parametrize("fmt", FP8 + ("mxfp8", "mxfp4"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_every_16bit_input(fmt, dtype, exact_fp8):
    x = every_16bit(dtype).reshape(256, 256).cuda()
    if fmt.startswith("mx"):
        check(x, QuantSpec(format=fmt), exact_fp8=exact_fp8)
        return
    check(x, QuantSpec(format=fmt, granularity="tensor"), torch.ones((), device="cuda"), exact_fp8=exact_fp8)
    check(x, QuantSpec(format=fmt, group_size=64), exact_fp8=exact_fp8)
    check(x, QuantSpec(format=fmt, group_size=64, scale_encoding="pow2"), exact_fp8=exact_fp8)


@pytest.mark.gpu
@pytest.mark.parametrize("exact_fp8", [False, True], ids=["hw_cast", "exact"])
@pytest.mark.parametrize("fmt", DUAL_FORMATS)
@pytest.mark.parametrize("shape", [(128, 128), (1000, 3000), (4096, 8192)], ids=str)
def test_gpu_dual_layout(fmt, shape, exact_fp8, rng):
    spec = QuantSpec(format=fmt)
    check_dual(random_input(shape, torch.bfloat16, rng).cuda(), spec, exact_fp8=exact_fp8)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [s for s in STATIC_SPECS if s.granularity.value in ("group", "tensor")], ids=str)
def test_gpu_explicit_scales(spec, rng):
    x = random_input((1000, 3000), torch.bfloat16, rng).cuda()
    exponents = torch.randn(spec.scale_shape(x.shape), generator=rng) * 4
    pow2 = spec.scale_encoding.value == "pow2"
    check(x, spec, torch.exp2(torch.round(exponents) if pow2 else exponents).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FP8 + ("int8_sym",))
def test_gpu_quotient_across_fp32_range(fmt, rng):
    for _ in range(20):
        every_bf16_under_scales_across_fp32(fmt, rng, "cuda")


@pytest.mark.gpu
def test_gpu_backend_runs_on_the_tensors_device(rng):
    """Triton launches on the current device: the backend makes the tensors' device current, so a
    tensor on cuda:1 is quantized, dequantized and multiplied there while cuda:0 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the second must not be the current device)")
    spec = QuantSpec(granularity="tile", tile=(128, 128))
    x = random_input((300, 260), torch.bfloat16, rng)
    with torch.cuda.device(0):
        got = dispatch.quantize(x.to("cuda:1"), spec)
        assert got.codes.device == torch.device("cuda:1")
        assert_same_qt(got, reference_quantize(x, spec))
        back = dispatch.dequantize(got, torch.float32)
        want = dispatch.dequantize(reference_quantize(x, spec), torch.float32, backend="reference")
        torch.testing.assert_close(back.cpu(), want, rtol=0, atol=0, equal_nan=True)
        finite = x.float().nan_to_num(0.0, 0.0, 0.0)
        a, b = (dispatch.quantize(finite.to("cuda:1"), s) for s in (QuantSpec(), spec))
        c = dispatch.matmul(a, b, torch.float32)
        want = dispatch.matmul(reference_quantize(finite, QuantSpec()), reference_quantize(finite, spec), torch.float32,
                               backend="reference")
        assert c.device == torch.device("cuda:1")
        assert float((c.cpu().double() - want.double()).norm() / want.double().norm()) < 3e-4
