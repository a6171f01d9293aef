"""The CPU backend (compiled) against the reference, bit for bit: codes, scales, zero points, dequantized values.

Compiling costs seconds a graph on CI's 2 cores, so the specs below cover every format,
granularity and scale encoding at least once with one input dtype each (rotating), rather
than the full cross product; many shapes then run through each graph.
"""
import logging
import math

import pytest
import torch
from torch._dynamo.utils import counters

from quantd.kernels import cpu, dispatch, reference
from quantd.kernels.spec import QuantizedTensor, QuantSpec

CASES = [  # (spec, input dtype)
    (QuantSpec("fp8_e4m3"), torch.bfloat16),  # the 1x128 default
    (QuantSpec("fp8_e4m3", "tile", tile=(16, 32)), torch.float32),
    (QuantSpec("fp8_e5m2", "channel", axis=1), torch.float16),
    (QuantSpec("fp8_e5m2", "flat", block_size=100, scale_encoding="pow2"), torch.bfloat16),
    (QuantSpec("int8_sym", "tensor"), torch.float32),
    (QuantSpec("int8_sym", "group", group_size=64, scale_encoding="pow2"), torch.float16),
    (QuantSpec("int8_asym", "group", group_size=32), torch.bfloat16),
    (QuantSpec("int8_asym", "tile", tile=(32, 64)), torch.float16),
    (QuantSpec("mxfp4"), torch.float32),
    (QuantSpec("mxfp8"), torch.bfloat16),
    (QuantSpec("nvfp4"), torch.float16),
    (QuantSpec("int8_asym", "tensor"), torch.bfloat16),  # a tensor's rows as its one block, with a zero point
]
SHAPES = [(64, 256), (33, 97), (5, 7, 70), (130,), (1, 1)]  # (1, 1) last: see the graph count below


def random_input(shape, dtype, rng):
    """Normal values over a wide range of magnitudes, with NaN, +-Inf, the dtype's max,
    a subnormal, and one all-zero row (an all-zero block in row-wise granularities)."""
    x = torch.randn(shape, generator=rng) * torch.exp2(torch.randint(-12, 12, shape, generator=rng).float())
    x = x.to(dtype)
    if x.dim() >= 2 and x.shape[0] > 2:
        x[1] = 0
    flat = x.view(-1)
    if flat.numel() >= 16:
        info = torch.finfo(dtype)
        flat[[0, 3, 5, 7, 9, 11]] = torch.tensor([math.nan, math.inf, -math.inf, -math.nan, info.max, info.tiny / 4],
                                                  dtype=dtype)
    return x


def bits(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same_values(a, b) -> bool:
    """Bit-identical dequantized values; NaNs match any NaN (payloads are unspecified)."""
    nan = torch.isnan(a)
    return a.dtype == b.dtype and torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a[~nan]), bits(b[~nan]))


def assert_same(q, r):
    assert q.codes.dtype == r.codes.dtype and q.codes.shape == r.codes.shape
    assert torch.equal(bits(q.codes), bits(r.codes))
    assert q.scales.dtype == r.scales.dtype and q.scales.shape == r.scales.shape
    assert torch.equal(bits(q.scales), bits(r.scales))
    assert (q.zero_points is None) == (r.zero_points is None)
    if r.zero_points is not None:
        assert torch.equal(q.zero_points, r.zero_points)
    assert (q.tensor_scale is None) == (r.tensor_scale is None)
    if r.tensor_scale is not None:
        assert torch.equal(bits(q.tensor_scale), bits(r.tensor_scale))


@pytest.mark.parametrize("spec,dtype", CASES, ids=[f"{s.describe()}-{str(d)[6:]}" for s, d in CASES])
def test_quantize_dequantize_bit_identical(spec, dtype, rng):
    graphs = None
    for shape in SHAPES:
        if spec.granularity.value == "channel" and len(shape) < 2:
            continue
        x = random_input(shape, dtype, rng)
        want = reference.quantize(x, spec)
        got = cpu.quantize(x, spec)
        assert_same(got, want)
        assert same_values(cpu.dequantize(want), reference.dequantize(want))
        # a non-contiguous view quantizes like its contiguous copy
        xt = x.transpose(0, -1) if x.dim() >= 2 else x[::2]
        assert_same(cpu.quantize(xt, spec), reference.quantize(xt.contiguous(), spec))
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        if shape == (130,):
            # every later shape reused the graphs compiled for the first one (blocks of one
            # element, as (1, 1) gives tensor/channel granularity, are specialized by dynamo)
            assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("spec,dtype", CASES, ids=[f"{s.describe()}-{str(d)[6:]}" for s, d in CASES])
def test_subnormal_blocks(spec, dtype, rng):
    """Blocks whose amax, scale and values are fp32 subnormals (no flush-to-zero in compiled code)."""
    low = -28 if dtype == torch.float16 else -140  # fp16 subnormals start at 2^-14
    x = torch.randn(33, 97, generator=rng) * torch.exp2(torch.randint(low, low + 20, (33, 1), generator=rng).float())
    x = x.to(dtype)
    assert_same(cpu.quantize(x, spec), want := reference.quantize(x, spec))
    assert same_values(cpu.dequantize(want, torch.float32), reference.dequantize(want, torch.float32))


@pytest.mark.parametrize("spec,dtype", CASES[:6], ids=[s.describe() for s, _ in CASES[:6]])
def test_explicit_scales(spec, dtype, rng):
    x = random_input((48, 256), dtype, rng)
    factor = 2.0 if spec.scale_encoding.value == "pow2" else 1.5  # pow2 scales must stay powers of two
    scales = reference.quantize(x, spec).scales.float() * factor
    assert_same(cpu.quantize(x, spec, scales), reference.quantize(x, spec, scales))


def test_int8_asym_rejects_explicit_scales():
    spec = QuantSpec("int8_asym")
    with pytest.raises(ValueError, match="int8_asym"):
        cpu.quantize(torch.randn(4, 128), spec, torch.ones(4, 1))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_dequantize_out_dtypes(out_dtype, rng):
    spec = QuantSpec("fp8_e4m3")
    qt = reference.quantize(random_input((40, 300), torch.bfloat16, rng), spec)
    assert same_values(cpu.dequantize(qt, out_dtype), reference.dequantize(qt, out_dtype))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_e2m1_dequantize_every_code(fmt, out_dtype):
    """Every code byte under scales across their range (E8M0: every byte, NaN included; E4M3: every non-NaN byte,
    with tensor scales that push results to Inf and to subnormals): the 16-bit outputs' word path against the
    reference, into a new tensor and into out=."""
    spec = QuantSpec(fmt)
    g = spec.group_size
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(g // 2, 1).t().contiguous()  # a byte a row
    if fmt == "mxfp4":
        scale_bytes = [torch.arange(256, dtype=torch.int32).to(torch.uint8)]
        tensor_scales = [None]
    else:
        scale_bytes = [torch.arange(127, dtype=torch.int32).to(torch.uint8), torch.arange(128, 255, dtype=torch.int32)
                       .to(torch.uint8)]  # 0x7F and 0xFF are E4M3's NaN
        tensor_scales = [torch.tensor(t) for t in (1.0, 2.0 ** -20, 2.0 ** 20, 3.0 * 2.0 ** -9)]
    for sb in scale_bytes:
        rows = codes.repeat(len(sb), 1)
        scales = sb.repeat_interleave(256).reshape(-1, 1).view(spec.scale_dtype)
        for ts in tensor_scales:
            qt = QuantizedTensor(rows, scales, spec, (rows.shape[0], g), None, ts)
            want = reference.dequantize(qt, out_dtype)
            assert same_values(cpu.dequantize(qt, out_dtype), want)
            out = torch.empty(want.shape, dtype=out_dtype)
            assert cpu.dequantize(qt, out_dtype, out=out) is out and same_values(out, want)


def test_matmul_and_dispatch_default(rng):
    a = random_input((16, 256), torch.bfloat16, rng).nan_to_num(0.0, 0.0, 0.0)
    b = random_input((24, 256), torch.bfloat16, rng).nan_to_num(0.0, 0.0, 0.0)
    spec = QuantSpec("fp8_e4m3")
    qa, qb = dispatch.quantize(a, spec), dispatch.quantize(b, spec)  # CPU tensors: the CPU backend
    assert_same(qa, reference.quantize(a, spec))
    assert same_values(dispatch.matmul(qa, qb), reference.matmul(qa, qb))


def test_empty_and_zero_dim(rng):
    spec = QuantSpec("fp8_e4m3", "tensor")
    for x in (torch.empty(0, 128), torch.tensor(3.5)):
        assert_same(cpu.quantize(x, spec), want := reference.quantize(x, spec))
        assert same_values(cpu.dequantize(want), reference.dequantize(want))


@pytest.mark.parametrize("spec,dtype", CASES, ids=[f"{s.describe()}-{str(d)[6:]}" for s, d in CASES])
def test_writes_into_out(spec, dtype, rng):
    """quantize and dequantize with out= (the server's shared memory): every byte written, the reference's bits;
    where the blocks are the input's own memory in order, by the compiled graph itself, which must not have fallen
    back to eager; elsewhere (padded blocks, tiles, channels of another axis) by a copy."""
    from quantd.kernels.spec import QuantizedTensor
    for shape in ((33, 97), (64, 256)):
        x = random_input(shape, dtype, rng)
        tensors = {name: torch.empty(tshape, dtype=tdtype) for name, tshape, tdtype in spec.storage(shape).tensors()}
        for t in tensors.values():
            t.reshape(-1).view(torch.uint8).fill_(7)  # a byte left unwritten shows
        out = QuantizedTensor.from_stored(tensors, spec, shape)
        want = reference.quantize(x, spec)
        assert cpu.quantize(x, spec, out=out) is out
        assert_same(out, want)
        values = torch.full(shape, 7.0, dtype=spec.dequant_dtype)
        assert cpu.dequantize(want, out=values) is values
        assert same_values(values, reference.dequantize(want))
        # as the server has them: every output a view of one client region, some calls' input in it too
        region = torch.empty(1 << 20, dtype=torch.uint8).fill_(7)
        at, tensors = 0, {}
        for name, tshape, tdtype in spec.storage(shape).tensors():
            n = math.prod(tshape) * tdtype.itemsize
            tensors[name] = region[at:at + n].view(tdtype).reshape(tshape)
            at += -(-n // 64) * 64
        inside = region[at:at + x.numel() * x.element_size()].view(dtype).reshape(shape).copy_(x)
        for source in (x, inside):
            out = QuantizedTensor.from_stored(tensors, spec, shape)
            assert cpu.quantize(source, spec, out=out) is out
            assert_same(out, want)
        values = region[at:at + math.prod(shape) * 4].view(torch.float32).reshape(shape)
        assert cpu.dequantize(want, torch.float32, out=values) is values
        assert same_values(values, reference.dequantize(want, torch.float32))
    for fn in (cpu._quantize_blocks, cpu._quantize_blocks_into, cpu._dequantize_blocks, cpu._dequantize_blocks_into,
               cpu._dequantize_tiles):
        assert (fn, spec) not in cpu._eager, fn.__name__  # E2M1's dequantize included
    # (64, 256): every spec here but tiles, channels of axis 1 and flat blocks of 100 has its blocks in order
    in_order = cpu._in_order(reference.to_blocks(x, spec, dtype=x.dtype), x)
    assert in_order == (spec.granularity.value not in ("tile", "flat") and spec.axis == 0), spec


def test_specs_differing_in_scale_encoding_or_output_dtype_share_dequantize_graphs(rng):
    """Dequantizing graphs take fp32 scale values and the output dtype as an argument: a spec's fp32 and pow2
    encodings, and its output dtypes, run one graph (compiled once), with the reference's bits."""
    specs = [QuantSpec("int8_sym", "group", group_size=80), QuantSpec("int8_sym", "group", group_size=80,
                                                                      scale_encoding="pow2", out_dtype="float32")]
    x = random_input((6, 160), torch.bfloat16, rng)
    qts = [cpu.quantize(x, spec) for spec in specs]  # quantizing graphs: one a spec, compiled before the count
    graphs = counters["stats"]["unique_graphs"]
    for qt in qts:
        for out_dtype in (None, torch.bfloat16):
            assert same_values(cpu.dequantize(qt, out_dtype), reference.dequantize(qt, out_dtype))
    assert counters["stats"]["unique_graphs"] == graphs + 2  # bf16 and fp32 out (the pow2 spec's default)


def test_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog, rng):
    """No working C++ compiler: a warning, then the same bits from the eager functions."""
    import torch._inductor.config as inductor_config
    spec = QuantSpec("fp8_e4m3", "group", group_size=48)  # compiled nowhere else
    monkeypatch.setattr(cpu, "_eager", set())
    x = random_input((8, 96), torch.float32, rng)
    # inductor's own patch (its settings are context variables, which monkeypatch's undo leaves broken for other
    # threads); no cached graph from an earlier run
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            caplog.at_level(logging.WARNING, logger=cpu.__name__):
        got = cpu.quantize(x, spec)
    assert (cpu._quantize_blocks, spec) in cpu._eager and "running eagerly" in caplog.text
    assert_same(got, reference.quantize(x, spec))



def test_without_the_compiler_the_same_bits_and_no_graph(monkeypatch, rng):
    """use_compiler(False) (`quantd serve --cpu-compile off`): every spec's quantize and dequantize, out= included,
    give the reference's bits from the block functions as they are: nothing traced or compiled, nothing marked."""
    monkeypatch.setattr(cpu, "_compiling", cpu._compiling)  # restored after the test
    cpu.use_compiler(False)
    graphs, compiled = counters["stats"]["unique_graphs"], cpu._compiled.cache_info().currsize
    for spec, dtype in CASES:
        x = random_input((33, 97), dtype, rng)
        want = reference.quantize(x, spec)
        assert_same(cpu.quantize(x, spec), want)
        assert same_values(cpu.dequantize(want), reference.dequantize(want))
        tensors = {name: torch.empty(shape, dtype=tdtype) for name, shape, tdtype in spec.storage(x.shape).tensors()}
        out = QuantizedTensor.from_stored(tensors, spec, x.shape)
        assert_same(cpu.quantize(x, spec, out=out), want)
    assert counters["stats"]["unique_graphs"] == graphs and cpu._compiled.cache_info().currsize == compiled
    cpu.use_compiler(True)
    assert cpu._compiling


@pytest.mark.slow
def test_many_specs_and_variants_stay_compiled_in_worker_threads(rng, monkeypatch):
    """As in the server, graphs are compiled in worker threads, for many specs and shapes: one spec through more
    graphs than dynamo's default limit (8: of 3 input dtypes x explicit scales or not x single- or many-element
    blocks, 9), its first compiled in another thread, then more specs than the graphs one code object may hold
    (cpu._RECOMPILE_LIMIT, lowered here from 64 to 9 so that fewer graphs are compiled: torch.compile of a
    functools.partial once put every spec's graphs under one shared wrapper's code); none falls back to eager, and
    every result is bit-identical to the reference."""
    import concurrent.futures

    monkeypatch.setattr(cpu, "_RECOMPILE_LIMIT", 9)
    many = QuantSpec("int8_sym", "tensor", scale_encoding="pow2")
    sizes = range(8, 8 * 6, 8)
    specs = [QuantSpec("fp8_e4m3", "group", group_size=g) for g in sizes]
    specs += [QuantSpec("int8_sym", "group", group_size=g) for g in sizes[:3]]
    specs += [QuantSpec("fp8_e5m2", "flat", block_size=8), QuantSpec("int8_asym", "group", group_size=8)]
    jobs = [(many, shape, dtype, explicit) for dtype in (torch.bfloat16, torch.float16)
            for explicit in (False, True) for shape in ((9, 40), (1, 1))] + [(many, (9, 40), torch.float32, False)]
    jobs += [(spec, (6, 144), torch.bfloat16, False) for spec in specs]
    assert len({spec for spec, *_ in jobs}) == 11 and len(specs) > cpu._RECOMPILE_LIMIT

    def run(job):
        spec, shape, dtype, explicit = job
        x = random_input(shape, dtype, rng).nan_to_num(0.0, 0.0, 0.0)
        scales = reference.quantize(x, spec).scales.float() * 2 if explicit else None
        return cpu.quantize(x, spec, scales), reference.quantize(x, spec, scales)

    before = set(cpu._eager)
    run(jobs[0])  # compiled here: a worker thread then finds the spec's compiled function made
    with concurrent.futures.ThreadPoolExecutor(1) as worker:  # in order, in a fresh thread
        results = list(worker.map(run, jobs))
    assert set(cpu._eager) == before, f"fell back to eager: {set(cpu._eager) - before}"
    for got, want in results:
        assert_same(got, want)


def test_calls_run_compiled_while_another_thread_traces_with_fx(rng, monkeypatch):
    """torch.fx keeps "tracing" in a global flag that inductor sets while it compiles (make_fx); a compiled call made
    meanwhile from another thread raised "Detected that you are using FX to symbolically trace a dynamo-optimized
    function" (the server's compute threads under torch 2.11). With the flag set as another thread's compile sets
    it: a spec compiled before and one compiled now both run compiled (no eager fallback), with the reference's
    bits."""
    import torch.fx._symbolic_trace as fx_trace

    before = QuantSpec("int8_sym", "group", group_size=48)
    fresh = QuantSpec("fp8_e5m2", "group", group_size=48, scale_encoding="pow2")
    x = random_input((6, 96), torch.bfloat16, rng)
    assert_same(cpu.quantize(x, before), reference.quantize(x, before))
    eager = set(cpu._eager)
    graphs = counters["stats"]["unique_graphs"]
    monkeypatch.setattr(fx_trace, "_is_fx_tracing_flag", True)
    for spec in (before, fresh):
        assert_same(cpu.quantize(x, spec), reference.quantize(x, spec))
    assert fx_trace._is_fx_tracing_flag  # left as the other thread has it
    assert set(cpu._eager) == eager and counters["stats"]["unique_graphs"] == graphs + 1  # the fresh spec's graph
