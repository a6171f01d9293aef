"""Malformed streams sent through the generated stub (or as raw bytes) get the right status, and the server keeps serving."""
import threading
import time

import grpc
import pytest
import torch
from test_chunks import field

from quantd.client import QuantdClient, QuantdError
from quantd.protocol import chunks, crc32c, wire
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

INVALID, DATA_LOSS, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", max_tensor_bytes=1 << 20, max_concurrent_streams=2,
                          piece_bytes=1024)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield quantd_pb2_grpc.QuantdStub(channel)
    channel.close()


def header(shape=(4, 64), dtype="bfloat16", **spec):
    spec = {"format": "fp8_e4m3", **spec}
    return pb.QuantizeRequest(header=pb.QuantizeHeader(tensor=pb.TensorInfo(name="x", dtype=dtype, shape=shape),
                                                       spec=pb.QuantSpec(**spec)))


def chunk(offset, data, tensor=0, crc=None, kind=pb.QuantizeRequest):
    msg = pb.Chunk(tensor=tensor, offset=offset, data=data)
    if crc is not None:
        msg.crc32c = crc
    return kind(chunk=msg)


def status_of(call_responses):
    """(code, details) once the response stream ends."""
    try:
        for _ in call_responses:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


DATA = bytes(range(256)) * 2  # 512 bytes: a (4, 64) bf16 tensor, finite values
QUANTIZE_CASES = {
    "unknown format": ([header(format="fp9")], INVALID, "fp9"),
    "unknown granularity": ([header(granularity="rows")], INVALID, "rows"),
    "mx format on tiles": ([header(format="mxfp4", granularity="tile")], INVALID, "1x32 groups"),
    "negative dimension": ([header(shape=(-4, 64))], INVALID, "negative dimension"),
    "0-d tensor in groups": ([header(shape=())], INVALID, "0-d"),
    "integer input": ([header(dtype="int8")], INVALID, "cannot be quantized"),
    "unknown dtype": ([header(dtype="float64")], INVALID, "unknown dtype 'float64'"),
    "chunk past the end": ([header(), chunk(0, DATA + b"x")], INVALID, "byte count mismatch"),
    "stream ends early": ([header(), chunk(0, DATA[:256])], INVALID, "missing chunks"),
    "chunk out of order": ([header(), chunk(256, DATA[256:]), chunk(0, DATA[:256])], INVALID, "out of order"),
    "chunks overlap": ([header(), chunk(0, DATA[:256]), chunk(128, DATA[128:])], INVALID, "overlaps"),
    "chunk of an undeclared tensor": ([header(), chunk(0, DATA, tensor=1)], INVALID, "declares 1 tensor"),
    "chunk before the header": ([chunk(0, DATA)], INVALID, "must be a header"),
    "empty stream": ([], INVALID, "empty request stream"),
    "second header": ([header(), header()], INVALID, "expected a chunk"),
    "checksum mismatch": ([header(), chunk(0, DATA, crc=crc32c.crc32c(DATA) ^ 1)], DATA_LOSS, "CRC32C mismatch"),
    "declared size over the limit": ([header(shape=(1024, 1024))], EXHAUSTED, "limit"),
}


@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_bad_quantize_streams_get_their_status(stub, case):
    messages, code, text = QUANTIZE_CASES[case]
    got, details = status_of(stub.Quantize(iter(messages), timeout=30))
    assert got == code, details
    assert text in details


def test_a_good_stream_with_checksums_passes(stub):
    messages = [header(), chunk(0, DATA[:300], crc=crc32c.crc32c(DATA[:300])), chunk(300, DATA[300:], crc=crc32c.crc32c(DATA[300:]))]
    assert status_of(stub.Quantize(iter(messages), timeout=30)) == (grpc.StatusCode.OK, "")


def raw_quantize(server, messages: list, response_deserializer=None) -> tuple:
    """(responses, code, details) of a Quantize call whose request messages are the bytes `messages`, sent as they are."""
    responses = []
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream("/quantd.v1.Quantd/Quantize", response_deserializer=response_deserializer)
        try:
            responses.extend(call(iter(messages), timeout=30))
        except grpc.RpcError as exc:
            return responses, exc.code(), exc.details()
    return responses, grpc.StatusCode.OK, ""


HEADER = header().SerializeToString()
RAW_CASES = {
    "truncated chunk": ([HEADER, chunks.encode(0, 0, DATA)[:100]], "malformed QuantizeRequest message (100 bytes)"),
    "chunk data cut short": ([HEADER, b"\x12\x05\x1a\x08abc"], "malformed QuantizeRequest message"),
    "garbage after the header": ([HEADER, b"\xff\xff\xff"], "malformed QuantizeRequest message"),
    "truncated header": ([HEADER[:len(HEADER) // 2]], "malformed QuantizeRequest message"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_messages_get_invalid_argument(server, case):
    messages, text = RAW_CASES[case]
    _, code, details = raw_quantize(server, messages)
    assert code == INVALID and text in details, details
    assert_still_serving(server)


def test_chunks_written_by_another_encoder_pass(server):
    """Chunk fields in reverse order, a zero written out and an unknown field, as other protobuf encoders may send them."""
    rest = DATA[200:]
    inner = (field(5, chunks.VARINT, 9) + field(chunks.CRC32C, chunks.VARINT, crc32c.crc32c(rest))
             + field(chunks.DATA, chunks.LEN, rest) + field(chunks.OFFSET, chunks.VARINT, 200) + field(chunks.TENSOR, chunks.VARINT, 0))
    messages = [HEADER, chunks.encode(0, 0, DATA[:200]), field(chunks.CHUNK_FIELD, chunks.LEN, inner)]
    responses, code, details = raw_quantize(server, messages, pb.QuantizeResponse.FromString)
    assert code == grpc.StatusCode.OK, details
    codes = b"".join(r.chunk.data for r in responses if r.WhichOneof("kind") == "chunk" and r.chunk.tensor == 0)
    x = torch.frombuffer(bytearray(DATA), dtype=torch.bfloat16).reshape(4, 64)
    assert codes == reference.quantize(x, QuantSpec("fp8_e4m3")).codes.view(torch.uint8).numpy().tobytes()


def dequantize_header(spec=QuantSpec("int8_asym", group_size=32), **change):
    qt = reference.quantize(torch.randn(4, 64), spec)
    operand = wire.quantized_operand(qt)
    for name, info in change.items():
        if info is None:
            operand.ClearField(name)
        else:
            getattr(operand, name).CopyFrom(info)
    return pb.DequantizeRequest(header=pb.DequantizeHeader(operand=operand))


def test_bad_dequantize_headers(stub):
    cases = [(dict(scales=pb.TensorInfo(name="scales", dtype="float32", shape=[4, 3])), "bad shape"),
             (dict(codes=pb.TensorInfo(name="codes", dtype="float8_e4m3fn", shape=[4, 64])), "dtype mismatch"),
             (dict(zero_points=None), "zero_points missing"),
             (dict(spec=QuantSpec("nvfp4"), tensor_scale=None), "tensor_scale missing"),
             (dict(spec=QuantSpec("nvfp4"), tensor_scale=pb.TensorInfo(name="tensor_scale", dtype="float32",
                                                                       shape=[1])), "bad shape"),
             (dict(tensor_scale=pb.TensorInfo(name="tensor_scale", dtype="float32")), "tensor_scale given, but")]
    for change, text in cases:
        code, details = status_of(stub.Dequantize(iter([dequantize_header(**change)]), timeout=30))
        assert code == INVALID and text in details, details


def test_bad_matmul_shapes(stub):
    def operand(shape):
        return pb.MatmulOperand(tensor=pb.TensorOperand(tensor=pb.TensorInfo(name="t", dtype="float32", shape=shape),
                                                        spec=pb.QuantSpec(format="fp8_e4m3")))
    for a, b in (((4, 64), (8, 32)), ((2, 4, 64), (8, 64))):
        request = pb.MatmulRequest(header=pb.MatmulHeader(a=operand(a), b=operand(b)))
        code, details = status_of(stub.Matmul(iter([request]), timeout=30))
        assert code == INVALID and "bad shape" in details, details
    code, details = status_of(stub.Matmul(iter([pb.MatmulRequest(header=pb.MatmulHeader(a=operand((4, 64))))]), timeout=30))
    assert code == INVALID and "operand B missing" in details


class Stalled:
    """A request stream that sends a header and half the data, then waits until released."""

    def __init__(self):
        self.release = threading.Event()

    def __iter__(self):
        yield header()
        yield chunk(0, DATA[:256])
        self.release.wait(30)
        yield chunk(256, DATA[256:])


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def assert_freed(server):
    """No stream in flight, every staging buffer handed back to the pool, nothing left of the memory budget."""
    wait_until(lambda: server.server.servicer.active_streams == 0)
    assert server.server.servicer.pool.lent == 0 and server.server.servicer.budget.used == 0


def assert_still_serving(server):
    x = torch.randn(8, 64)
    with QuantdClient(server.target) as c:
        got = c.quantize(x, QuantSpec(), report=False)
    assert torch.equal(got.codes.view(torch.uint8), reference.quantize(x, QuantSpec()).codes.view(torch.uint8))


def test_too_many_concurrent_streams(server, stub):
    stalled = [Stalled(), Stalled()]
    calls = [stub.Quantize(iter(s), timeout=30) for s in stalled]
    for call in calls:
        assert next(call).WhichOneof("kind") == "header"  # both admitted
    code, details = status_of(stub.Quantize(iter([header(), chunk(0, DATA)]), timeout=30))
    assert code == EXHAUSTED and "too many concurrent streams" in details
    for s in stalled:
        s.release.set()
    assert [status_of(call)[0] for call in calls] == [grpc.StatusCode.OK] * 2
    assert_freed(server)
    assert_still_serving(server)


def test_cancel_mid_stream_frees_the_stream(server, stub):
    stalled = Stalled()
    call = stub.Quantize(iter(stalled), timeout=30)
    assert next(call).WhichOneof("kind") == "header"
    wait_until(lambda: server.server.servicer.pool.lent >= 512)  # taken when the first chunk arrived
    call.cancel()
    assert status_of(call)[0] == grpc.StatusCode.CANCELLED
    stalled.release.set()
    assert_freed(server)
    assert_still_serving(server)


def test_deadline_mid_stream_frees_the_stream(server, stub):
    stalled = Stalled()
    call = stub.Quantize(iter(stalled), timeout=1.0)
    assert next(call).WhichOneof("kind") == "header"
    assert status_of(call)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    stalled.release.set()
    assert_freed(server)
    assert_still_serving(server)


def test_client_raises_one_error_type_with_the_status(server):
    with QuantdClient(server.target) as c:
        with pytest.raises(QuantdError) as info:
            c.quantize(torch.randint(0, 5, (4, 64), dtype=torch.int32))
        assert info.value.code == INVALID and "int32" in info.value.details
        with pytest.raises(QuantdError) as info:
            c.quantize(torch.randn(1024, 1024))
        assert info.value.code == EXHAUSTED and "max_tensor_bytes" in info.value.details
    with QuantdClient(server.target, timeout=0.001) as c, pytest.raises(QuantdError) as info:
        c.quantize(torch.randn(256, 256))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
