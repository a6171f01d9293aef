"""A real server on 127.0.0.1 and the real client: results are bit-identical to the local reference."""
import concurrent.futures
import os

import grpc
import numpy as np
import pytest
import torch

from quantd.client import QuantdClient, QuantdError, QuantizeResult
from quantd.protocol import wire
from quantd.kernels import dispatch, reference
from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig


# The server's device; QUANTD_TEST_DEVICE=cuda runs the same checks against the GPU kernels.
DEVICE = os.environ.get("QUANTD_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def server():
    # Tiny pieces and chunks (the smallest a request may ask for) so every tensor below is pipelined and chunked
    # many times over.
    config = ServerConfig(host="127.0.0.1", port=0, device=DEVICE, piece_bytes=2048, chunk_bytes=1500)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    # A CPU server compiles each new spec on its first call; on a loaded machine (pytest -n 16 next to
    # the GPU tests) that took over 60 s, so the deadline only guards against hangs.
    with QuantdClient(server.target, chunk_bytes=4096, timeout=600) as c:
        yield c


def sample(shape, dtype, rng) -> torch.Tensor:
    """Random values with the edge cases mixed in: zero blocks, +-max, subnormals, NaN, +-Inf, huge values."""
    x = (torch.randn(shape, generator=rng) * torch.exp(torch.randn(shape, generator=rng) * 2)).to(dtype)
    flat = x.view(-1)
    n = flat.numel()
    if n >= 64:
        flat[:32] = 0
        specials = torch.tensor([448.0, -448.0, 57344.0, 1e-40, -3e-39, float("nan"), float("inf"), -float("inf"),
                                 6.0, -0.0, 2.0 ** -9, 65504.0]).to(dtype)
        idx = torch.randint(32, n, (len(specials),), generator=rng)
        flat[idx] = specials
    return x


def assert_same_bytes(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype, what
    assert tuple(got.shape) == tuple(want.shape), what
    assert bytes(wire.tensor_bytes(got)) == bytes(wire.tensor_bytes(want)), what


def assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str):
    """Equal dtype, shape and bits, except that any NaN equals any NaN (backends may differ in NaN payloads)."""
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), what
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), what
    assert torch.equal(torch.where(nan, 0, got).view(-1).view(torch.uint8) if got.numel() else got,
                       torch.where(nan, 0, want).view(-1).view(torch.uint8) if want.numel() else want), what


def on_device(qt: QuantizedTensor) -> QuantizedTensor:
    """`qt` on the test server's device, to run the same kernels locally."""
    return QuantizedTensor.from_stored({name: t.to(DEVICE) for name, t in qt.stored().items()}, qt.spec, qt.shape)


def assert_same_quantization(got, want):
    """Codes, scales, zero points and tensor scale: the same tensors, byte for byte."""
    assert list(got.stored()) == list(want.stored())
    for name, t in want.stored().items():
        assert_same_bytes(getattr(got, name), t, name)


FP8_INT8 = ["fp8_e4m3", "fp8_e5m2", "int8_sym", "int8_asym"]
GRANULARITIES = [dict(granularity="tensor"), dict(granularity="channel", axis=0), dict(granularity="channel", axis=-1),
                 dict(granularity="group", group_size=48), dict(granularity="tile", tile=(8, 32)),
                 dict(granularity="flat", block_size=100)]
# Every format with every granularity; the scale encoding alternates (each costs the CPU server compiled graphs of
# its own), so that every format but INT8 asym (fp32 only) and every granularity meet pow2 scales.
SPECS = [QuantSpec(fmt, scale_encoding="pow2" if (i + j) % 2 and fmt != "int8_asym" else "fp32", **g)
         for i, fmt in enumerate(FP8_INT8) for j, g in enumerate(GRANULARITIES)]
assert all(any(s.scale_encoding.value == "pow2" and s.granularity.value == g["granularity"] for s in SPECS)
           for g in GRANULARITIES)
SPECS += [QuantSpec("mxfp4"), QuantSpec("mxfp8"), QuantSpec("mxfp4", out_dtype="float32"), QuantSpec("nvfp4"),
          QuantSpec("nvfp4", out_dtype="float32")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("index,spec", list(enumerate(SPECS)), ids=lambda v: v.describe() if isinstance(v, QuantSpec) else "")
def test_every_format_and_granularity_round_trips_bit_identical(client, index, spec, rng):
    dtype = DTYPES[index % 3]
    x = sample((3, 21, 75), dtype, rng)  # ragged against every block size above
    got = client.quantize(x, spec, report=True, dequantized=True)
    want = reference.quantize(x, spec)
    assert_same_quantization(got, want)
    assert got.spec == spec and got.shape == tuple(x.shape)
    # Dequantized values: bit for bit what the server's kernels give when called locally on its device, and
    # the reference's values (backends may differ in the payload and sign of a NaN). Into fp32 as well for every
    # third spec (a graph more to compile on a CPU server): every granularity and format, MXFP4 by its spec that
    # dequantizes into fp32.
    for out_dtype in (None, torch.float32) if index % 3 == 1 else (None,):
        got_deq = client.dequantize(got, out_dtype)
        assert_same_bytes(got_deq, dispatch.dequantize(on_device(want), out_dtype).cpu(), "Dequantize")
        assert_same_values(got_deq, reference.dequantize(want, out_dtype), "Dequantize")
    assert_same_bytes(got.dequantized, dispatch.dequantize(on_device(want)).cpu(), "dequantized")
    want_report = reference.report(x, want)
    assert got.report.keys() == want_report.keys()
    for key, value in want_report.items():  # on a GPU the sums behind the SQNR run in another order
        assert got.report[key] == pytest.approx(value, rel=0 if DEVICE == "cpu" else 1e-12, nan_ok=True), key


@pytest.mark.parametrize("shape", [(), (1,), (0, 64), (5, 0), (1, 1, 1), (300,), (2, 1, 513)])
def test_odd_shapes(client, shape, rng):
    x = torch.randn(shape, generator=rng).bfloat16()
    for spec in (QuantSpec(granularity="tensor"), QuantSpec("int8_asym", "flat", block_size=7), QuantSpec("mxfp4"),
                 QuantSpec("nvfp4")):
        try:
            want = reference.quantize(x, spec)
        except (ValueError, RuntimeError, IndexError):  # 0-d with groups; some empty tensors
            with pytest.raises(QuantdError):
                client.quantize(x, spec, report=False)
            continue
        assert_same_quantization(client.quantize(x, spec, report=False), want)


def test_non_contiguous_and_numpy_inputs(client, rng):
    spec = QuantSpec("fp8_e4m3", group_size=32)
    x = torch.randn(64, 80, generator=rng)
    assert_same_quantization(client.quantize(x.T, spec), reference.quantize(x.T.contiguous(), spec))
    for array in (x.numpy(), x.half().numpy()):
        assert_same_quantization(client.quantize(array, spec), reference.quantize(torch.from_numpy(array), spec))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = x.bfloat16()
    array = bf16.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    assert_same_quantization(client.quantize(array, spec), reference.quantize(bf16, spec))


def test_checksums_both_ways(server, rng):
    x = sample((40, 300), torch.bfloat16, rng)
    spec = QuantSpec("int8_asym", "tile", tile=(16, 64))
    with QuantdClient(server.target, chunk_bytes=4096, checksums=True) as c:
        got = c.quantize(x, spec, dequantized=True)
        assert_same_quantization(got, reference.quantize(x, spec))
        assert_same_bytes(c.dequantize(got), reference.dequantize(reference.quantize(x, spec)), "dequantize")


MATMUL_CASES = [QuantSpec("fp8_e4m3", group_size=32), QuantSpec("mxfp8"), QuantSpec("mxfp4"),
                QuantSpec("fp8_e5m2", "tile", tile=(16, 16)), QuantSpec("int8_sym", "channel", axis=0),
                QuantSpec("int8_asym", "tensor"), QuantSpec("nvfp4")]


@pytest.mark.parametrize("spec", MATMUL_CASES, ids=lambda s: s.describe())
def test_matmul_matches_the_local_kernels(client, spec, rng):
    """Bit for bit what dispatch.matmul gives on the server's device (on CPU: the reference itself)."""
    a, b = torch.randn(128, 256, generator=rng).bfloat16(), torch.randn(40, 256, generator=rng).bfloat16()
    qa, qb = reference.quantize(a, spec), reference.quantize(b, spec)
    try:
        want = dispatch.matmul(on_device(qa), on_device(qb), torch.float32).cpu()
    except ValueError as exc:  # a GEMM backend that does not take this layout
        with pytest.raises(QuantdError) as info:
            client.matmul(a, b, a_spec=spec, b_spec=spec)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(exc) in info.value.details
        return
    if DEVICE == "cpu":
        assert_same_bytes(want, reference.matmul(qa, qb, torch.float32), "the CPU GEMM is the reference")
    assert_same_bytes(client.matmul(a, b, a_spec=spec, b_spec=spec, out_dtype=torch.float32), want, "tensors in")
    server_qa = client.quantize(a, spec, report=False)
    assert_same_bytes(client.matmul(server_qa, b, b_spec=spec, out_dtype=torch.float32), want, "mixed")
    assert_same_bytes(client.matmul(qa, qb), dispatch.matmul(on_device(qa), on_device(qb)).cpu(), "quantized in, bf16 out")


def test_concurrent_clients(server, rng):
    spec = QuantSpec("fp8_e4m3", group_size=64)
    inputs = [sample((16 + i, 200), torch.bfloat16, rng) for i in range(12)]

    def one(x):
        with QuantdClient(server.target, chunk_bytes=4096) as c:
            return c.quantize(x, spec, report=False)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, inputs))
    for x, got in zip(inputs, results):
        assert_same_quantization(got, reference.quantize(x, spec))
    assert server.server.servicer.active_streams == 0


def test_server_info(client):
    info = client.server_info()
    assert info["backend"] == ("cpu" if DEVICE == "cpu" else "triton")
    assert set(info["formats"]) == {"fp8_e4m3", "fp8_e5m2", "int8_sym", "int8_asym", "mxfp4", "mxfp8", "nvfp4"}
    assert "e4m3" in info["scale_encodings"]
    assert info["limits"]["chunk_bytes"] == 1500 and info["draining"] is False


@pytest.mark.slow
def test_a_tensor_over_2_gib_streams_through():
    """3 GiB of bf16 (past the 2 GiB limits of one message and of int32 byte offsets), pipelined by rows."""
    rows, cols = 3 * 2 ** 30 // (2 * 4096), 4096
    spec = QuantSpec("fp8_e4m3", group_size=128)
    g = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))
    block = torch.randn(4096, cols, generator=g).bfloat16()
    x = torch.empty(rows, cols, dtype=torch.bfloat16)
    for start in range(0, rows, 4096):  # distinct rows per block: scale each copy differently
        x[start:start + 4096] = block * (1 + start // 4096)
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu")
    with BackgroundServer(config) as running, QuantdClient(running.target) as c:
        got = c.quantize(x, spec, report=False)
    assert got.codes.shape == x.shape and got.scales.shape == (rows, cols // 128)
    for start in (0, rows // 2 + 123, rows - 1000):
        want = reference.quantize(x[start:start + 1000], spec)
        assert_same_bytes(got.codes[start:start + 1000], want.codes, f"codes at row {start}")
        assert_same_bytes(got.scales[start:start + 1000], want.scales, f"scales at row {start}")


@pytest.mark.gpu
def test_cuda_tensors_in_and_out(client, rng):
    x = sample((33, 300), torch.bfloat16, rng)
    spec = QuantSpec("mxfp8")
    got = client.quantize(x.cuda(), spec, report=False)
    assert got.codes.is_cuda and got.scales.is_cuda
    assert_same_quantization(QuantizeResult(got.codes.cpu(), got.scales.cpu(), spec, got.shape), reference.quantize(x, spec))
    assert client.dequantize(got).is_cuda
