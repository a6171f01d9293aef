"""The wire protocol: committed stubs match the .proto files, QuantSpec <-> proto, CRC32C, pipelined pieces, config."""
import argparse
import dataclasses
import os
import pathlib
import tempfile

import pytest
import torch
from google.protobuf import descriptor_pb2

from quantd.protocol import crc32c as crc
from quantd.protocol import wire
from quantd.kernels import reference
from quantd.kernels.spec import Format, QuantSpec
from quantd.server import config as server_config
from quantd.protocol.pieces import plan_pieces
from quantd.v1 import quantd_pb2, quantd_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def compiled_descriptors() -> dict:
    """FileDescriptorProtos protoc makes of protos/quantd/v1/*.proto now."""
    from grpc_tools import protoc
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        files = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos/quantd/v1").glob("*.proto"))
        assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}"] + files) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(open(out, "rb").read())
    for file in fds.file:  # protoc fills in json_name; generated code leaves it out
        for message in file.message_type:
            _clear_json_names(message)
    return {f.name: f for f in fds.file}


def _clear_json_names(message):
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def test_generated_stubs_match_the_proto_files():
    compiled = compiled_descriptors()
    committed = descriptor_pb2.FileDescriptorProto.FromString(quantd_pb2.DESCRIPTOR.serialized_pb)
    assert set(compiled) == {committed.name}, "a .proto file has no committed stubs: run protos/generate.py"
    assert compiled[committed.name] == committed, "protocol/_generated is stale: run protos/generate.py"
    service = quantd_pb2.DESCRIPTOR.services_by_name["Quantd"]
    for method in service.methods:  # the grpc stubs cover every RPC of the descriptor
        assert hasattr(quantd_pb2_grpc.QuantdServicer, method.name)
        assert f"/quantd.v1.Quantd/{method.name}" in open(quantd_pb2_grpc.__file__).read()


def test_proto_spec_mirrors_quantspec_field_for_field():
    proto_fields = [f.name for f in quantd_pb2.QuantSpec.DESCRIPTOR.fields]
    assert proto_fields == [f.name for f in dataclasses.fields(QuantSpec)]


SPECS = [QuantSpec(), QuantSpec("mxfp4"), QuantSpec("mxfp8"), QuantSpec("int8_asym", "tile", tile=(4, 8)),
         QuantSpec("fp8_e5m2", "channel", axis=-1, scale_encoding="pow2", out_dtype="float32"),
         QuantSpec("int8_sym", "flat", block_size=7, out_dtype="float16"), QuantSpec(granularity="tensor")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_spec_round_trips_through_proto(spec):
    msg = wire.spec_to_proto(spec)
    assert wire.spec_from_proto(quantd_pb2.QuantSpec.FromString(msg.SerializeToString())) == spec


def test_unset_proto_fields_take_quantspec_defaults():
    assert wire.spec_from_proto(quantd_pb2.QuantSpec(format="mxfp8")) == QuantSpec("mxfp8")
    assert wire.spec_from_proto(quantd_pb2.QuantSpec(format="int8_sym", axis=0, granularity="channel")) == \
        QuantSpec("int8_sym", "channel", axis=0)
    with pytest.raises(ValueError, match="fp9"):
        wire.spec_from_proto(quantd_pb2.QuantSpec(format="fp9"))


def _crc_bitwise(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (crc.POLY if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_crc32c_known_values():
    assert crc.crc32c(b"") == 0
    assert crc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc.crc32c(bytes(32)) == 0x8A9136AA      # RFC 3720 B.4: 32 bytes of zeros
    assert crc.crc32c(b"\xff" * 32) == 0x62A8AB43   # RFC 3720 B.4: 32 bytes of ones


@pytest.mark.parametrize("n", [1, 3, 1023, 1024, 1025, 4096 + 13, 70001])
def test_crc32c_matches_the_bitwise_definition(n):
    data = os.urandom(n)
    print("data", data[:16].hex())
    assert crc.crc32c(data) == _crc_bitwise(data)
    cut = n // 3
    assert crc.crc32c(data[cut:], crc.crc32c(data[:cut])) == crc.crc32c(data)
    assert crc.combine(crc.crc32c(data[:cut]), crc.crc32c(data[cut:]), n - cut) == crc.crc32c(data)


def test_crc32c_large_buffer_against_chained_small_pieces():
    data = os.urandom((1 << 20) + 777)
    chained = 0
    for start in range(0, len(data), 5000):
        chained = crc.crc32c(data[start:start + 5000], chained)
    assert crc.crc32c(data) == chained
    assert crc.crc32c(memoryview(data)[100:70000]) == _crc_bitwise(data[100:70000])


PIECE_CASES = [  # spec, shape, whether it pipelines (more than one piece of 300 bytes)
    (QuantSpec(group_size=64), (5, 7, 150), True), (QuantSpec("mxfp4"), (9, 65), True), (QuantSpec("mxfp8"), (3, 96), True),
    (QuantSpec(granularity="tile", tile=(4, 16)), (3, 11, 40), True),
    (QuantSpec("int8_asym", "tile", tile=(3, 5)), (40, 7), True),
    (QuantSpec("int8_asym", "flat", block_size=64), (1000, 3), True),
    (QuantSpec("fp8_e5m2", "channel", axis=0), (40, 3, 7), True), (QuantSpec("int8_sym", "channel", axis=-2), (40, 9), True),
    (QuantSpec(granularity="tensor"), (10, 50), False), (QuantSpec(granularity="channel", axis=1), (10, 50), False),
    (QuantSpec(group_size=32), (300,), False),
]


@pytest.mark.parametrize("spec,shape,pipelines", PIECE_CASES,
                         ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v))
def test_pieces_quantize_to_the_whole_tensors_bytes(spec, shape, pipelines, rng):
    x = torch.randn(shape, generator=rng).bfloat16() * 10
    x.view(-1)[::17] = 0
    whole = reference.quantize(x, spec)
    pieces = plan_pieces(spec, shape, piece_bytes=300, itemsize=2)
    assert pieces[0].start == 0 and pieces[-1].end == x.numel()
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert (len(pieces) > 1) == pipelines
    parts = [reference.quantize(x.reshape(-1)[p.start:p.end].view(p.shape), spec) for p in pieces]
    for field in ("codes", "scales", "zero_points"):
        if getattr(whole, field) is None:
            assert all(getattr(p, field) is None for p in parts)
            continue
        joined = b"".join(bytes(wire.tensor_bytes(getattr(p, field))) for p in parts)
        assert joined == bytes(wire.tensor_bytes(getattr(whole, field))), field


def test_server_config_from_environment_and_flags():
    env = {"QUANTD_PORT": "6000", "QUANTD_AUTH_TOKENS": "a,b", "QUANTD_DRAIN_SECONDS": "2.5",
           "QUANTD_MAX_TENSOR_BYTES": "1000"}
    cfg = server_config.from_env(env)
    assert (cfg.port, cfg.auth_tokens, cfg.drain_seconds, cfg.max_tensor_bytes) == (6000, ("a", "b"), 2.5, 1000)
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    args = parser.parse_args(["--port", "7000", "--auth-token", "x", "--auth-token", "y", "--device", "cpu"])
    cfg = server_config.from_args(args, env)
    assert (cfg.port, cfg.auth_tokens, cfg.device, cfg.max_tensor_bytes) == (7000, ("x", "y"), "cpu", 1000)
    with pytest.raises(ValueError, match="log_format"):
        server_config.ServerConfig(log_format="xml")
    assert server_config.from_env({"QUANTD_CPU_COMPILE": "off"}).cpu_compile == "off"
    assert server_config.from_args(parser.parse_args(["--cpu-compile", "on"]), {"QUANTD_CPU_COMPILE": "off"}) \
        .cpu_compile == "on"
    with pytest.raises(ValueError, match="cpu_compile must be 'on' or 'off', got 'fast'"):
        server_config.ServerConfig(cpu_compile="fast")


def test_dtype_names_cover_every_code_and_scale_dtype():
    for fmt in Format:
        spec = QuantSpec(fmt)
        for dtype in (spec.code_dtype, spec.scale_dtype, spec.dequant_dtype):
            assert wire.dtype_from_name(wire.dtype_name(dtype)) == dtype
    with pytest.raises(ValueError, match="float64"):
        wire.dtype_from_name("float64")
