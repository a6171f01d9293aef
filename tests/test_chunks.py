"""quantd.protocol.chunks against protobuf: the same bytes out, any valid encoding read alike, bad bytes refused."""
import random

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from quantd.client import QuantdError
from quantd.protocol import chunks, crc32c
from quantd.client.api import _collect
from quantd.v1 import quantd_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Quantd"]
MESSAGES = [getattr(pb, t.name) for m in SERVICE.methods if m.client_streaming for t in (m.input_type, m.output_type)]
U32, U64 = 2 ** 32 - 1, 2 ** 64 - 1


def test_every_streaming_message_carries_the_chunk_as_field_2():
    assert len(MESSAGES) == 6
    for message_type in MESSAGES:
        field = message_type.DESCRIPTOR.fields_by_name["chunk"]
        assert field.number == chunks.CHUNK_FIELD and field.containing_oneof.name == "kind"
        assert field.message_type == pb.Chunk.DESCRIPTOR
    types = FieldDescriptor
    assert [(f.name, f.number, f.type) for f in pb.Chunk.DESCRIPTOR.fields] == [
        ("tensor", chunks.TENSOR, types.TYPE_UINT32), ("offset", chunks.OFFSET, types.TYPE_INT64),
        ("data", chunks.DATA, types.TYPE_BYTES), ("crc32c", chunks.CRC32C, types.TYPE_UINT32)]


def random_chunk(rng: random.Random) -> tuple:
    """(tensor, offset, data, crc32c or None), edge values often."""
    tensor = rng.choice([0, 1, 2, 127, 128, U32, rng.randrange(U32)])
    offset = rng.choice([0, 1, 127, 128, 2 ** 32 - 1, 2 ** 32 + 5, 2 ** 40 + 3, 2 ** 63 - 1, -1, -2 ** 63,
                         rng.randrange(2 ** 62)])
    data = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 16383, 16384, 70000]))
    crc = rng.choice([None, None, 0, 1, U32, rng.randrange(U32)])
    return tensor, offset, data, crc


def protobuf_message(message_type, tensor, offset, data, crc):
    message = message_type()
    message.chunk.SetInParent()  # an all-default chunk still sets the oneof
    message.chunk.tensor, message.chunk.offset, message.chunk.data = tensor, offset, data
    if crc is not None:
        message.chunk.crc32c = crc
    return message


def as_tuple(decoded):
    """A decoded message in a form to compare: the fields of a Chunk, or the message itself."""
    if isinstance(decoded, chunks.Chunk):
        return ("chunk", decoded.tensor, decoded.offset, bytes(decoded.data), decoded.crc32c)
    if decoded.WhichOneof("kind") == "chunk":
        c = decoded.chunk
        return ("chunk", c.tensor, c.offset, c.data, c.crc32c if c.HasField("crc32c") else None)
    return decoded


def protobuf_reading(raw: bytes, message_type):
    """What protobuf makes of `raw`: as_tuple of the message, or DecodeError."""
    try:
        return as_tuple(message_type.FromString(raw))
    except DecodeError:
        return DecodeError


def codec_reading(raw: bytes, message_type):
    try:
        return as_tuple(chunks.decode(raw, message_type))
    except ValueError:
        return DecodeError


@pytest.mark.parametrize("message_type", MESSAGES, ids=lambda t: t.__name__)
def test_encode_writes_what_protobuf_serializes_and_decode_reads_it(message_type):
    rng = random.Random(message_type.__name__)
    for _ in range(400):
        tensor, offset, data, crc = random_chunk(rng)
        message = protobuf_message(message_type, tensor, offset, data, crc)
        wire = message.SerializeToString()
        assert chunks.encode(tensor, offset, memoryview(data), crc) == wire
        assert chunks.encode(tensor, offset, data, crc) == wire
        decoded = chunks.decode(wire, message_type)
        assert isinstance(decoded, chunks.Chunk) and isinstance(decoded.data, memoryview)
        assert as_tuple(decoded) == ("chunk", tensor, offset, data, crc)


def test_decoded_data_is_a_view_of_the_message():
    wire = chunks.encode(3, 1 << 33, b"x" * 1000, 7)
    data = chunks.decode(wire, pb.QuantizeRequest).data
    assert data.obj is wire and bytes(data) == b"x" * 1000


# ---- other encoders ----------------------------------------------------------------------------------


def varint(value: int, width: int = 0) -> bytes:
    """The varint of `value` (two's complement for negatives), padded with continuation bytes to `width` bytes."""
    value &= U64
    out = bytearray()
    while value > 0x7F or len(out) + 1 < width:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, wire_type: int, value) -> bytes:
    key = varint(number << 3 | wire_type)
    if wire_type == chunks.VARINT:
        return key + varint(value)
    if wire_type == chunks.LEN:
        return key + varint(len(value)) + value
    return key + value  # I64 / I32: value holds the raw little-endian bytes


def unknown_field(rng: random.Random) -> bytes:
    number = rng.choice([5, 6, 15, 16, 2047, 2 ** 29 - 1])
    wire_type = rng.choice([chunks.VARINT, chunks.I64, chunks.LEN, chunks.I32])
    value = {chunks.VARINT: rng.randrange(2 ** 64), chunks.I64: rng.randbytes(8), chunks.LEN: rng.randbytes(rng.randrange(20)),
             chunks.I32: rng.randbytes(4)}[wire_type]
    return field(number, wire_type, value)


def shuffled(rng: random.Random, fields: list) -> list:
    """The bytes of `fields` ((number, bytes) pairs) in a random order that keeps repeated numbers in theirs."""
    keys = [rng.random() for _ in fields]
    for number in {n for n, _ in fields}:
        same = [i for i, (n, _) in enumerate(fields) if n == number]
        for i, key in zip(same, sorted(keys[i] for i in same)):
            keys[i] = key
    return [b for _, b in sorted(zip(keys, (b for _, b in fields)))]


def other_encoding(rng: random.Random, tensor, offset, data, crc) -> bytes:
    """A chunk message as another encoder may write it: fields in any order, zeros written or left out, fields
    repeated (the last counts), unknown fields, over-long varints, the chunk split in two (protobuf merges them)."""
    fields = []
    for number, value in ((chunks.TENSOR, tensor), (chunks.OFFSET, offset), (chunks.CRC32C, crc)):
        if value is None or (value == 0 and rng.random() < 0.5):
            continue
        if rng.random() < 0.3:
            fields.append((number, field(number, chunks.VARINT, rng.randrange(2 ** 64))))  # the next one counts
        fields.append((number, varint(number << 3 | chunks.VARINT) + varint(value, rng.choice([0, 0, 10]))))
    if data or rng.random() < 0.5:
        if rng.random() < 0.3:
            fields.append((chunks.DATA, field(chunks.DATA, chunks.LEN, rng.randbytes(5))))
        fields.append((chunks.DATA, field(chunks.DATA, chunks.LEN, data)))
    fields += [(0, unknown_field(rng)) for _ in range(rng.choice([0, 0, 1, 3]))]
    inner = shuffled(rng, fields)
    if rng.random() < 0.2:  # the chunk field twice: protobuf merges the two
        cut = rng.randrange(len(inner) + 1)
        return field(2, chunks.LEN, b"".join(inner[:cut])) + field(2, chunks.LEN, b"".join(inner[cut:]))
    outer = [field(2, chunks.LEN, b"".join(inner))]
    if rng.random() < 0.2:
        outer.insert(rng.randrange(2), unknown_field(rng))
    return b"".join(outer)


@pytest.mark.parametrize("message_type", [pb.QuantizeRequest, pb.MatmulResponse], ids=lambda t: t.__name__)
def test_decode_reads_any_valid_encoding_as_protobuf_does(message_type):
    rng = random.Random(1)
    for _ in range(3000):
        raw = other_encoding(rng, *random_chunk(rng))
        want = protobuf_reading(raw, message_type)
        assert want is not DecodeError
        assert codec_reading(raw, message_type) == want, raw[:64]


def test_headers_and_summaries_are_protobuf_messages():
    header = pb.QuantizeRequest(header=pb.QuantizeHeader(tensor=pb.TensorInfo(name="x", dtype="float32", shape=[2, 3])))
    assert chunks.decode(header.SerializeToString(), pb.QuantizeRequest) == header
    summary = pb.QuantizeResponse(summary=pb.Summary(bytes=[1, 2], crc32c=[3, 4]))
    assert chunks.decode(summary.SerializeToString(), pb.QuantizeResponse) == summary
    assert chunks.kind(chunks.decode(b"", pb.QuantizeRequest)) is None
    # a header after a chunk in one message: the oneof's last field counts, as in protobuf
    raw = chunks.encode(0, 0, b"abc") + header.SerializeToString()
    assert chunks.decode(raw, pb.QuantizeRequest) == header
    assert as_tuple(chunks.decode(header.SerializeToString() + chunks.encode(1, 2, b"abc"), pb.QuantizeRequest)) == \
        ("chunk", 1, 2, b"abc", None)


def test_decode_refuses_what_protobuf_refuses():
    """Truncations, flipped bytes and appended garbage of valid messages: the codec fails where protobuf fails
    (with ValueError) and reads the same fields where protobuf reads some."""
    rng = random.Random(2)
    for _ in range(300):
        tensor, offset, data, crc = random_chunk(rng)
        data = data[:200]
        wire = rng.choice([chunks.encode(tensor, offset, data, crc), other_encoding(rng, tensor, offset, data, crc)])
        mutants = [wire[:rng.randrange(len(wire))], wire + rng.randbytes(rng.randrange(1, 4))]
        for _ in range(4):
            flipped = bytearray(wire)
            flipped[rng.randrange(min(len(wire), 24))] = rng.randrange(256)
            mutants.append(bytes(flipped))
        for raw in mutants:
            assert codec_reading(raw, pb.QuantizeRequest) == protobuf_reading(raw, pb.QuantizeRequest), raw[:64]


def chunk_message(inner: bytes) -> bytes:
    return field(chunks.CHUNK_FIELD, chunks.LEN, inner)


@pytest.mark.parametrize("raw", [
    chunk_message(b"\x10" + b"\xff" * 9 + b"\x01\x1a\x00"),  # offset -1 as its 10-byte varint
    chunk_message(b"\x10" + b"\xff" * 9 + b"\x7f\x1a\x00"),  # a 10th varint byte with bits past 64
    chunk_message(b"\x10" + b"\xff" * 10 + b"\x01"),          # an 11-byte varint
    chunk_message(b"\x08\x80\x80\x80\x80"),                  # tensor's varint cut off
    chunk_message(b"\x1a\x05abc"),                             # data longer than the chunk
    b"\x12\x10\x1a\x05abc",                                    # chunk longer than the message
    chunk_message(b"\x00\x01"),                                 # field number 0
    chunk_message(b"\x0b\x0c"),                                 # a group (wire types 3 and 4) for field 1
    chunk_message(b"\x2b\x08\x01\x2c\x08\x07"),                 # a group of an unknown field
    chunk_message(b"\x0a\x00\x08\x03"),                         # tensor with the wrong wire type
    chunk_message(b"\x18\x05"),                                 # data with the wrong wire type
    chunk_message(varint((2 ** 29 - 1) << 3) + b"\x01"),        # the largest field number
    chunk_message(varint(2 ** 29 << 3) + b"\x01"),              # past the largest field number
    chunk_message(b"\x0e"),                                      # wire type 6
], ids=lambda raw: raw.hex())
def test_decode_edge_cases_match_protobuf(raw):
    assert codec_reading(raw, pb.QuantizeRequest) == protobuf_reading(raw, pb.QuantizeRequest)


def test_malformed_messages_get_a_clear_error():
    wire = chunks.encode(0, 0, b"\0" * 100)
    with pytest.raises(ValueError, match=r"malformed QuantizeRequest message \(50 bytes\): .*runs past"):
        chunks.decode(wire[:50], pb.QuantizeRequest)
    with pytest.raises(ValueError, match="malformed DequantizeResponse message"):
        chunks.decode(b"\xff\xff", pb.DequantizeResponse)


# ---- writer and reader -------------------------------------------------------------------------------


def test_writer_cuts_tensors_and_reader_puts_them_back():
    rng = np.random.default_rng(0)
    tensors = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1000, 0, 37)]
    writer = chunks.ChunkWriter(len(tensors), chunk_bytes=300)
    messages = [writer.message(i, piece, crc32c.crc32c(piece))
                for i, t in enumerate(tensors) for piece in writer.pieces(memoryview(t))]
    assert len(messages) == 4 + 0 + 1 and writer.sent == [1000, 0, 37]
    assert writer.crcs == [crc32c.crc32c(t) for t in tensors]
    buffers = [np.zeros_like(t) for t in tensors]
    reader = chunks.ChunkReader(buffers, ["a", "", "c"])
    for raw in messages:
        chunk = chunks.decode(raw, pb.MatmulResponse)
        reader.check(chunk)
        reader.verify(chunk)
        reader.store(chunk)
    reader.check_complete()
    assert all(np.array_equal(b, t) for b, t in zip(buffers, tensors))
    assert reader.crcs == writer.crcs


def test_reader_refuses_chunks_that_do_not_continue_their_tensor():
    reader = chunks.ChunkReader([np.zeros(10, np.uint8)], ["x"])
    for chunk, text in ((chunks.Chunk(1, 0, b"a"), "declares 1 tensor"), (chunks.Chunk(0, 3, b"a"), "out of order"),
                        (chunks.Chunk(0, 0, b"a" * 11), "past the 10 bytes")):
        with pytest.raises(ValueError, match=text):
            reader.check(chunk)
    reader.store(chunks.Chunk(0, 0, b"abc"))
    with pytest.raises(ValueError, match="overlaps"):
        reader.check(chunks.Chunk(0, 2, b"a"))
    with pytest.raises(chunks.ChecksumMismatch, match="CRC32C mismatch in chunk of tensor 'x' at offset 3"):
        reader.verify(chunks.Chunk(0, 3, b"abc", crc32c.crc32c(b"abd")))
    with pytest.raises(ValueError, match="after 3 of the 10 bytes of tensor 'x'"):
        reader.check_complete()


def response_stream(data: bytes, chunk_crc=None, summary_bytes=None, offset=0):
    header = pb.QuantizeResponse(header=pb.OutputHeader(tensors=[pb.TensorInfo(name="codes", dtype="uint8", shape=[len(data)])]))
    summary = pb.QuantizeResponse(summary=pb.Summary(bytes=[len(data) if summary_bytes is None else summary_bytes],
                                                     crc32c=[crc32c.crc32c(data)]))
    return [header.SerializeToString(), chunks.encode(0, offset, data, chunk_crc), summary.SerializeToString()]


def test_client_checks_the_response_stream():
    data = bytes(range(200))
    out, _ = _collect(response_stream(data, crc32c.crc32c(data)), pb.QuantizeResponse, checksums=True)
    assert out["codes"].numpy().tobytes() == data
    cases = [(response_stream(data, offset=5), grpc.StatusCode.INTERNAL, "out of order"),
             (response_stream(data, crc32c.crc32c(data) ^ 1), grpc.StatusCode.DATA_LOSS, "CRC32C mismatch"),
             (response_stream(data, summary_bytes=300), grpc.StatusCode.DATA_LOSS, "the server sent [300]"),
             (response_stream(data)[1:], grpc.StatusCode.INTERNAL, "chunk before the header"),
             (response_stream(data)[:2] + [b"\x1a\x05ab"], grpc.StatusCode.INTERNAL, "malformed QuantizeResponse")]
    for responses, code, text in cases:
        with pytest.raises(QuantdError) as info:
            _collect(responses, pb.QuantizeResponse, checksums=False)
        assert info.value.code == code and text in info.value.details, info.value.details
