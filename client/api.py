"""QuantdClient: quantize, dequantize and multiply through a quantd server.

    from quantd.client import QuantdClient
    from quantd.kernels import QuantSpec

    with QuantdClient("localhost:50051") as client:
        qt = client.quantize(weight, QuantSpec("fp8_e4m3", group_size=128))
        qt.codes, qt.scales, qt.report          # torch tensors (float8_e4m3fn codes), a dict
        w = client.dequantize(qt)

Inputs are torch tensors (CPU or CUDA; CUDA ones are copied to the host to be sent and the
results come back on the same device) or numpy arrays (numpy has no bfloat16: pass a torch
tensor, or an ml_dtypes.bfloat16 array). Every failure is a QuantdError carrying the gRPC
status code. Quantize, Dequantize, Matmul and GetServerInfo have no side effects, so a call
that meets UNAVAILABLE (a server down or draining) is sent again, whole, up to `retries`
times; with several targets gRPC's round_robin balancing sends it to another server.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import grpc
import torch

from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

from quantd.protocol import chunks, wire
from quantd.protocol.crc32c import crc32c

from .channels import make_channel

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
SERVICE = pb.DESCRIPTOR.services_by_name["Quantd"]
# The streaming RPCs' (request, response) classes. Their messages travel raw: quantd.protocol.chunks writes
# and reads the chunks without protobuf's copies of the payload.
STREAMS = {m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
           for m in SERVICE.methods if m.client_streaming}


class QuantdError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's (or client's) message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclasses.dataclass
class QuantizeResult(QuantizedTensor):
    """A QuantizedTensor plus what the server measured (`report`: amax, sqnr_db, saturated,
    nan_count; None unless asked for) and the dequantized tensor (None unless asked for)."""

    report: Optional[dict] = None
    dequantized: Optional[torch.Tensor] = None


def as_dict(message) -> dict:
    """A message's fields as plain Python values (nested messages as dicts, repeated fields as lists)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            value = [as_dict(v) for v in value] if field.is_repeated else as_dict(value)
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def _requests(request_type, header, tensors, chunk_bytes: int, checksums: bool):
    """The header, then every tensor's bytes in encoded chunk messages."""
    yield request_type(header=header)
    writer = chunks.ChunkWriter(len(tensors), chunk_bytes)
    for index, tensor in enumerate(tensors):
        for piece in writer.pieces(wire.tensor_bytes(tensor)):
            yield writer.message(index, piece, crc32c(piece) if checksums else None)


def _collect(responses, response_type, checksums: bool):
    """(tensors by name, Summary) of a stream of raw `response_type` messages, checked against its header and summary."""
    buffers, infos, reader, summary = [], [], None, None
    try:
        for raw in responses:
            message = chunks.decode(raw, response_type)
            kind = chunks.kind(message)
            if kind == "chunk":
                if reader is None:
                    raise ValueError("a chunk before the header")
                reader.check(message)
                if message.crc32c is not None:
                    reader.verify(message)
                reader.store(message)
            elif kind == "header":
                infos = list(message.header.tensors)
                # zeros, not empty: torch fills in parallel, taking the first-touch page faults on every core now
                # instead of one at a time in this thread as chunks arrive
                buffers = [torch.zeros(wire.info_nbytes(i), dtype=torch.uint8) for i in infos]
                reader = chunks.ChunkReader([b.numpy() for b in buffers], [i.name for i in infos])
            elif kind == "summary":
                summary = message.summary
    except chunks.ChecksumMismatch as exc:
        raise QuantdError(grpc.StatusCode.DATA_LOSS, f"response: {exc}") from None
    except ValueError as exc:
        raise QuantdError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from None
    if summary is None:
        raise QuantdError(grpc.StatusCode.INTERNAL, "the response stream ended without a summary")
    received, crcs = (reader.received, reader.crcs) if reader else ([], [])
    if list(summary.bytes) != [len(b) for b in buffers] or received != list(summary.bytes):
        raise QuantdError(grpc.StatusCode.DATA_LOSS, f"received {received} bytes, the server sent {list(summary.bytes)}")
    if checksums and list(summary.crc32c) != crcs:
        raise QuantdError(grpc.StatusCode.DATA_LOSS, "CRC32C of the whole response differs from the server's")
    return {info.name: wire.tensor_from_buffer(buf, info) for info, buf in zip(infos, buffers)}, summary


class QuantdClient:
    """A connection to one quantd server, or to several (a list, "a:p,b:p", or "dns:///name:port").

    timeout: seconds per call (a deadline), None for none. retries: how many times a call that met
    UNAVAILABLE is sent again. chunk_bytes: size of the messages tensors are cut into. checksums: put
    a CRC32C on every chunk, both ways (off by default: TCP and TLS already check the bytes, and
    the CRC costs a little throughput). token, root_certificates, private_key, certificate_chain:
    bearer-token authentication and (mutual) TLS, see quantd.client.channels.make_channel.
    """

    def __init__(self, target, *, token: str | None = None, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 timeout: float | None = None, retries: int = 3, chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
                 checksums: bool = False, options=()):
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), *options]
        self.channel = make_channel(target, root_certificates=root_certificates, private_key=private_key,
                                    certificate_chain=certificate_chain, token=token, options=options)
        self.stub = quantd_pb2_grpc.QuantdStub(self.channel)
        self.streams = {name: self.channel.stream_stream(f"/{SERVICE.full_name}/{name}", request_serializer=chunks.serialize)
                        for name in STREAMS}
        self.timeout = timeout
        self.retries = retries
        self.chunk_bytes = chunk_bytes
        self.checksums = checksums

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls ---------------------------------------------------------------------------
    def _call(self, attempt, timeout):
        """Run attempt(timeout) with retries on UNAVAILABLE; grpc.RpcError becomes QuantdError."""
        timeout = self.timeout if timeout is None else timeout
        for tries in range(self.retries + 1):
            try:
                return attempt(timeout)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or tries == self.retries:
                    raise QuantdError(exc.code(), exc.details() or "") from None
            time.sleep(min(0.05 * 2 ** tries, 1.0))

    def _stream(self, rpc: str, header, tensors, timeout):
        """Send a header and tensors on the streaming RPC `rpc`; (output tensors by name, Summary)."""
        tensors = [t.detach().cpu() for t in tensors]
        request_type, response_type = STREAMS[rpc]

        def attempt(deadline):
            requests = _requests(request_type, header, tensors, self.chunk_bytes, self.checksums)
            return _collect(self.streams[rpc](requests, timeout=deadline), response_type, self.checksums)
        return self._call(attempt, timeout)

    def quantize(self, tensor, spec: QuantSpec | None = None, *, report: bool = True, dequantized: bool = False,
                 timeout: float | None = None) -> QuantizeResult:
        """Quantize a bf16/fp16/fp32 tensor with `spec` (default QuantSpec()); the result is bit-identical
        to quantd.kernels.quantize(tensor, spec) and sits on the tensor's device."""
        x = wire.as_torch(tensor)
        spec = spec or QuantSpec()
        header = pb.QuantizeHeader(tensor=wire.tensor_info("input", x.dtype, x.shape), spec=wire.spec_to_proto(spec),
                                   return_dequantized=dequantized, return_report=report,
                                   chunk_bytes=self.chunk_bytes, checksums=self.checksums)
        out, summary = self._stream("Quantize", header, [x], timeout)
        out = {name: t.to(x.device) for name, t in out.items()}
        return QuantizeResult(out["codes"], out["scales"], spec, tuple(x.shape), out.get("zero_points"),
                              report=as_dict(summary.report) if report else None,
                              dequantized=out.get("dequantized"))

    def dequantize(self, qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *,
                   timeout: float | None = None) -> torch.Tensor:
        """The high-precision tensor of `qt` (in out_dtype, default qt.spec.out_dtype), on qt.codes' device."""
        header = pb.DequantizeHeader(operand=wire.quantized_operand(qt), chunk_bytes=self.chunk_bytes,
                                     checksums=self.checksums)
        if out_dtype is not None:
            header.out_dtype = wire.dtype_name(out_dtype)
        out, _ = self._stream("Dequantize", header, wire.operand_tensors(qt), timeout)
        return out["output"].to(qt.codes.device)

    def matmul(self, a, b, *, a_spec: QuantSpec | None = None, b_spec: QuantSpec | None = None,
               out_dtype: torch.dtype = torch.bfloat16, timeout: float | None = None) -> torch.Tensor:
        """C = A @ B^T for A (M, K) and B (N, K): QuantizedTensors, or tensors the server quantizes with
        a_spec / b_spec (default QuantSpec())."""
        operands, tensors = [], []
        for operand, spec in ((a, a_spec), (b, b_spec)):
            if isinstance(operand, QuantizedTensor):
                operands.append(pb.MatmulOperand(quantized=wire.quantized_operand(operand)))
                tensors += wire.operand_tensors(operand)
            else:
                x = wire.as_torch(operand)
                operands.append(pb.MatmulOperand(tensor=pb.TensorOperand(
                    tensor=wire.tensor_info("input", x.dtype, x.shape), spec=wire.spec_to_proto(spec or QuantSpec()))))
                tensors.append(x)
        header = pb.MatmulHeader(a=operands[0], b=operands[1], out_dtype=wire.dtype_name(out_dtype),
                                 chunk_bytes=self.chunk_bytes, checksums=self.checksums)
        device = (a.codes if isinstance(a, QuantizedTensor) else wire.as_torch(a)).device
        out, _ = self._stream("Matmul", header, tensors, timeout)
        return out["output"].to(device)

    def quantize_checkpoint(self, src, dst, **options):
        """Quantize the Hugging Face model folder `src` into `dst` in a serving stack's layout
        (quantd.client.checkpoint.quantize_checkpoint: profile=, scheme=, ignore=, ...)."""
        from .checkpoint import quantize_checkpoint
        return quantize_checkpoint(self, src, dst, **options)

    def convert_checkpoint(self, src, dst, **options):
        """Rewrite a quantized model folder in another profile (profile=, scheme=); exact pairs are re-laid out,
        others need allow_lossy=True (dequantize and quantize again)."""
        from .checkpoint import convert_checkpoint
        return convert_checkpoint(self, src, dst, **options)

    def dequantize_checkpoint(self, src, dst, **options):
        """Write a quantized model folder (any profile) as a plain bf16 one (dtype= to choose)."""
        from .checkpoint import dequantize_checkpoint
        return dequantize_checkpoint(self, src, dst, **options)

    @staticmethod
    def inspect_checkpoint(src) -> dict:
        """Profile, scheme, tensor counts, bytes and problems of a model folder (no server needed)."""
        from .checkpoint import inspect_checkpoint
        return inspect_checkpoint(src)

    def server_info(self, *, timeout: float | None = None) -> dict:
        """Version, backend, device, supported formats and limits of the server answering."""
        info = self._call(lambda deadline: self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=deadline), timeout)
        return as_dict(info)
