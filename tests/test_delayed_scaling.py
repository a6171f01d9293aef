"""Explicit scales and the input's amax through the service: delayed scaling, end to end through a real server.

Every result is compared bit for bit with the reference quantized with the same scales, on every transport that
carries them (streamed chunks in several pieces, shared memory, parallel streams); the amax with the reference's.
"""
import math

import grpc
import pytest
import torch
from triton_cases import random_input

from quantd.client import AmaxHistory, QuantdClient, QuantdError
from quantd.kernels import dispatch, reference
from quantd.kernels.spec import QuantSpec
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig

SPECS = [QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp8_e5m2", "tensor", scale_encoding="pow2"),
         QuantSpec("int8_sym", "tensor"), QuantSpec("fp8_e4m3", group_size=32),
         QuantSpec("fp8_e4m3", "tile", tile=(8, 32)), QuantSpec("int8_sym", "flat", block_size=96),
         QuantSpec("fp8_e4m3", "channel", axis=0), QuantSpec("mxfp8"), QuantSpec("nvfp4")]


@pytest.fixture(scope="module")
def server():
    # 4 KiB pieces: a 48 x 96 bf16 input is quantized in several pieces, each with its run of the scales
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", piece_bytes=4096)) as running:
        yield running


@pytest.fixture(scope="module")
def clients(server):
    """A client per transport, kept for the module: the streams one starts its worker processes once."""
    made = {transport: QuantdClient(server.target, transport=transport, parallel_streams=3)
            for transport in ("grpc", "shm", "streams")}
    yield made
    for client in made.values():
        client.close()


def random_scales(spec: QuantSpec, shape, gen) -> torch.Tensor:
    exponents = torch.randn(reference.given_scale_shape(spec, shape), generator=gen) * 3
    return torch.exp2(torch.round(exponents) if spec.scale_encoding.value == "pow2" else exponents)


def assert_same(got, want):
    assert got.stored().keys() == want.stored().keys()
    for name, b in want.stored().items():
        assert torch.equal(got.stored()[name].reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


def same_bits(a: float, b: torch.Tensor) -> bool:
    return torch.tensor(a, dtype=torch.float32).view(torch.int32) == b.view(torch.int32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_backends_quantize_with_given_scales_and_report_the_amax(spec, rng):
    x = random_input((48, 96), torch.bfloat16, rng)
    scales = random_scales(spec, x.shape, rng)
    for backend in ("reference", "cpu"):
        qt, amax = dispatch.quantize_with_amax(x, spec, scales=scales, backend=backend)
        assert_same(qt, reference.quantize(x, spec, scales))
        assert amax.view(torch.int32) == reference.amax(x).view(torch.int32)
    qt, amax = dispatch.quantize_with_amax(x, spec, backend="cpu")  # no scales: the tensor's own, and its amax
    assert_same(qt, reference.quantize(x, spec))
    assert float(amax) == x.float().abs().nan_to_num(0, 0, 0).max()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("transport", ["grpc", "shm", "streams"])
@pytest.mark.parametrize("shape", [(48, 96), (41, 100)], ids=str)  # (41, 100): uneven pieces, ragged blocks
def test_service_quantizes_with_given_scales_on_every_transport(clients, spec, transport, shape, rng):
    x = random_input(shape, torch.bfloat16, rng)
    scales = random_scales(spec, x.shape, rng)
    client = clients[transport]
    got = client.quantize(x, spec, scales=scales, amax=True, report=False)
    if transport == "streams" and spec.granularity.value != "tensor" and spec.format.value != "nvfp4":
        assert got.transport.transport == "streams"
    assert_same(got, reference.quantize(x, spec, scales))
    assert same_bits(got.amax, reference.amax(x))
    plain = client.quantize(x, spec, report=False)
    assert plain.amax is None
    assert_same(plain, reference.quantize(x, spec))


@pytest.mark.parametrize("transport", ["grpc", "streams"])
def test_bad_scales_are_refused_and_the_server_keeps_serving(clients, transport, rng):
    x = random_input((4, 64), torch.float32, rng)
    client = clients[transport]
    cases = [
        (QuantSpec("fp8_e4m3", group_size=32), torch.ones(3), "scales must have shape [4, 2], got [3]"),
        (QuantSpec("fp8_e4m3", "tensor"), torch.tensor(-1.0), "explicit scales must be positive and finite"),
        (QuantSpec("fp8_e4m3", "tensor"), torch.tensor(math.inf), "explicit scales must be positive and finite"),
        (QuantSpec("mxfp8"), torch.full((4, 2), 0.3), "pow2 scales must be powers of two"),
        (QuantSpec("int8_asym", "tensor"), torch.tensor(1.0), "int8_asym derives its scales"),
        (QuantSpec("nvfp4"), torch.ones(4, 4), "scales must have its tensor scale alone, one value, got [16]"),
    ]
    for spec, scales, message in cases:
        with pytest.raises(QuantdError) as info:
            client.quantize(x, spec, scales=scales, report=False)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details, info.value
    assert_same(client.quantize(x, QuantSpec()), reference.quantize(x, QuantSpec()))
    got = client.quantize(x, QuantSpec("nvfp4"), amax=True)  # a format of derived scales still reports its amax
    assert_same(got, reference.quantize(x, QuantSpec("nvfp4")))
    assert same_bits(got.amax, reference.amax(x))


def test_amax_history_gives_delayed_scaling(server, rng):
    """A few training steps: the first computes its own scale, later ones take the history's and read their input
    once; each step's codes are the reference's with that scale, and the history keeps the last `length` values."""
    spec = QuantSpec("fp8_e4m3", "tensor")
    history = AmaxHistory(spec, length=2)
    steps = [random_input((64, 128), torch.bfloat16, rng, edge_cases=False) * s for s in (1.0, 4.0, 0.5, 0.25)]
    with QuantdClient(server.target) as client:
        for i, x in enumerate(steps):
            scales = history.scales()
            got = client.quantize(x, spec, scales=scales, amax=True, report=False)
            assert_same(got, reference.quantize(x, spec, scales))
            if i == 0:
                assert scales is None
                assert_same(got, reference.quantize(x, spec))  # no history yet: the tensor's own scale
            else:
                want = reference.tensor_scale(max(float(reference.amax(s)) for s in steps[max(0, i - 2):i]), spec)
                assert scales.view(torch.int32) == want.view(torch.int32)
            history.update(got.amax)
    assert list(history.values) == [float(reference.amax(s)) for s in steps[-2:]]
    with pytest.raises(ValueError, match="per-tensor spec"):
        AmaxHistory(QuantSpec())
