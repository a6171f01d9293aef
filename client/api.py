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
that meets UNAVAILABLE (a server down, draining or frozen) or RESOURCE_EXHAUSTED (a server
full), or a stream that gets no response within `stall_timeout`, is sent again, whole, up to
`retries` times, within the call's one deadline, with backoff and a retry budget shared by
the client's calls; with several targets gRPC's round_robin balancing sends it to another server.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Optional

import grpc
import torch

from quantd.kernels.spec import QuantizedTensor, QuantSpec
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

from quantd.protocol import chunks, local, wire
from quantd.protocol.crc32c import crc32c
from quantd.protocol.pieces import unit_shape

from . import transports
from .channels import make_channel
from .local import LocalSocket, LocalSocketError

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
SERVICE, STREAMS = chunks.SERVICE, chunks.STREAMS


class QuantdError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's (or client's) message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Stalled(Exception):
    """A stream that received no response within the client's stall_timeout (its server is frozen or lost)."""


class RetryBudget:
    """Retries a client may still make: each costs a token, each call that succeeds gives back a tenth of one (as
    gRPC's retry throttling), so a client facing servers that all fail stops multiplying its load on them."""

    def __init__(self, tokens: float = 10.0):
        self.most = self.tokens = tokens
        self._lock = threading.Lock()

    def spend(self) -> bool:
        with self._lock:
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True

    def earn(self) -> None:
        with self._lock:
            self.tokens = min(self.most, self.tokens + 0.1)


def _watched(call, stall_timeout: float | None):
    """The responses of a streaming call; Stalled (the call cancelled) when the first takes over stall_timeout.
    A server sends its first response as soon as it has admitted the stream, before any computing."""
    if stall_timeout is None:
        yield from call
        return
    stalled = threading.Event()

    def give_up():
        stalled.set()
        call.cancel()
    timer = threading.Timer(stall_timeout, give_up)
    timer.start()
    try:
        for response in call:
            timer.cancel()
            yield response
    except grpc.RpcError:
        if stalled.is_set():
            raise Stalled(f"no response within {stall_timeout:g} s (stall_timeout)") from None
        raise
    finally:
        timer.cancel()


@dataclasses.dataclass
class QuantizeResult(QuantizedTensor):
    """A QuantizedTensor plus what the server measured (`report`: amax, sqnr_db, saturated,
    nan_count; None unless asked for) and the dequantized tensor (None unless asked for)."""

    report: Optional[dict] = None
    dequantized: Optional[torch.Tensor] = None
    transport: Optional[transports.Choice] = None
    amax: Optional[float] = None  # the input's largest finite |x|, when asked for (amax=True)


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


def _collect(responses, response_type, checksums: bool, into=None):
    """(tensors by name, Summary) of a stream of raw `response_type` messages, checked against its header and summary.
    into(TensorInfo): the uint8 tensor an output is written into (ValueError for one not expected), else new ones."""
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
                buffers = [torch.zeros(wire.info_nbytes(i), dtype=torch.uint8) if into is None else into(i)
                           for i in infos]
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


def _summary(responses, response_type):
    """The Summary of a response stream whose outputs went into shared-memory regions (no chunks)."""
    summary = None
    for raw in responses:
        message = chunks.decode(raw, response_type)
        if chunks.kind(message) == "chunk":
            raise QuantdError(grpc.StatusCode.INTERNAL, "malformed response: a chunk in a response into regions")
        if chunks.kind(message) == "summary":
            summary = message.summary
    if summary is None:
        raise QuantdError(grpc.StatusCode.INTERNAL, "the response stream ended without a summary")
    return summary


class QuantdClient:
    """A connection to one quantd server, or to several (a list, "a:p,b:p", or "dns:///name:port").

    timeout: seconds per call (a deadline for all its attempts), None for none. retries: how many times a call
    that met UNAVAILABLE or RESOURCE_EXHAUSTED, or stalled, is sent again. stall_timeout: seconds a stream waits
    for its first response before it is given up and sent again (None: no limit). chunk_bytes: size of the
    messages tensors are cut into. checksums: put
    a CRC32C on every chunk, both ways (off by default: TCP and TLS already check the bytes, and
    the CRC costs a little throughput). token, root_certificates, private_key, certificate_chain:
    bearer-token authentication and (mutual) TLS, see quantd.client.channels.make_channel.
    transport: "grpc" (stream the bytes), "ipc" (CUDA tensors by their CUDA IPC handles), "shm" (shared memory on
    the server's host), "streams" (a Quantize split over parallel_streams connections, one per worker process:
    quantd.client.streams) or "auto" (the first of ipc, shm, streams that works); a transport that cannot serve a
    call falls back to grpc, and last_transport says which one ran and why (quantd.client.transports).
    local_socket: send the memory calls of ipc and shm on the server's Unix socket where it has one (no gRPC round
    trip; quantd.client.local), else through gRPC; local_socket_reason says why a call could not.
    """

    def __init__(self, target, *, token: str | None = None, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 timeout: float | None = None, retries: int = 3, chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES,
                 checksums: bool = False, stall_timeout: float | None = 10.0, options=(), transport: str = "grpc",
                 parallel_streams: int = 1, local_socket: bool = True):
        self._settings = dict(target=target, token=token, root_certificates=root_certificates, private_key=private_key,
                              certificate_chain=certificate_chain, timeout=timeout, retries=retries,
                              chunk_bytes=chunk_bytes, checksums=checksums, stall_timeout=stall_timeout, options=options)
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), *options]
        self.channel = make_channel(target, root_certificates=root_certificates, private_key=private_key,
                                    certificate_chain=certificate_chain, token=token, options=options)
        self.stub = quantd_pb2_grpc.QuantdStub(self.channel)
        self.streams = {name: self.channel.stream_stream(f"/{SERVICE.full_name}/{name}", request_serializer=chunks.serialize)
                        for name in STREAMS}
        self.timeout = timeout
        self.retries = retries
        self.stall_timeout = stall_timeout
        self.retry_budget = RetryBudget()
        self.chunk_bytes = chunk_bytes
        self.checksums = checksums
        self.transport = transports.check(transport)
        self.parallel_streams = parallel_streams
        self.last_transport: transports.Choice | None = None
        self._shm: transports.ShmTransport | None = None
        self._ipc: transports.IpcTransport | None = None  # CUDA IPC in the session of _shm
        self._unary_in_memory = True  # the server has QuantizeInMemory and its kin
        self._local_path = "" if local_socket else None  # the server's local socket, once a session is open
        self._local_idle: list = []  # connections to it, not in use
        self.local_socket_reason = "" if local_socket else "not asked for"  # why memory calls go through gRPC
        self._shm_error: str | None = None
        self._server_uuids: list | None = None  # the GPUs whose CUDA IPC handles the server can open
        self.last_placement = ""  # where the server computed the last call and why (Summary.placement)
        self._workers = None  # streams.StreamWorkers: processes sending parallel streams, started on first use

    def close(self) -> None:
        self._local_path = None
        while self._local_idle:
            self._local_idle.pop().close()
        if self._ipc is not None:
            self._ipc.close()
        if self._shm is not None:
            self._shm.close()
        if self._workers is not None:
            self._workers.close()
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls ---------------------------------------------------------------------------
    def _call(self, attempt, timeout):
        """Run attempt(seconds left) with retries (RETRYABLE codes, stalls) within one deadline; grpc.RpcError
        becomes QuantdError."""
        timeout = self.timeout if timeout is None else timeout
        ends = None if timeout is None else time.monotonic() + timeout
        for tries in range(self.retries + 1):
            left = None if ends is None else max(0.0, ends - time.monotonic())
            try:
                result = attempt(left)
                self.retry_budget.earn()
                return result
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except Stalled as exc:
                code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
            backoff = min(0.05 * 2 ** tries, 1.0)
            out_of_time = ends is not None and time.monotonic() + backoff >= ends
            if code not in RETRYABLE or tries == self.retries or out_of_time or not self.retry_budget.spend():
                raise QuantdError(code, details)
            time.sleep(backoff)

    def _shm_reason(self) -> str | None:
        """None once a shared-memory session is open on the server, else why there is none. A server that cannot
        see this host's memory is remembered; a failure that may pass (UNAVAILABLE, a deadline) is tried again."""
        if self._shm is None and self._shm_error is None:
            try:
                self._shm = transports.ShmTransport(self.stub)
                if self._local_path == "":  # the socket of the process that holds the session
                    self._local_path = self.server_info().get("local_socket", "")
                    self.local_socket_reason = "" if self._local_path else "the server has no local socket"
            except grpc.RpcError as exc:
                reason = f"the server cannot use this host's shared memory ({exc.code().name}: {exc.details()})"
                if exc.code() in RETRYABLE + (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    return reason
                self._shm_error = reason
            except OSError as exc:
                self._shm_error = f"cannot create a shared-memory region here: {exc}"
        return self._shm_error

    def _ipc_reason(self, tensors) -> str | None:
        """None when the server can open these tensors' CUDA IPC handles, else why not."""
        if not all(t.is_cuda for t in tensors):
            return "the tensors are not all on a GPU"
        shm_reason = self._shm_reason()
        if shm_reason is not None:
            return f"no proof that the server shares this host ({shm_reason})"
        if len({t.device for t in tensors}) > 1:
            return "the tensors are on several GPUs"
        local = transports.device_uuid(tensors[0].device)
        if self._server_uuids is None:
            info = self.server_info()
            # a server that predates ipc_device_uuids opens handles of its own GPU only
            self._server_uuids = info["ipc_device_uuids"] or [u for u in [info["device_uuid"]] if u]
        if not self._server_uuids:
            return f"the server computes on the CPU, the tensors are on {local}"
        if local not in self._server_uuids:
            return f"the tensors are on {local}, a GPU the server does not see (it sees {', '.join(self._server_uuids)})"
        return None

    def _choose(self, transport, tensors, streams_reason=lambda: "only Quantize splits a tensor over streams") -> str:
        self.last_transport = transports.choose(transport or self.transport, lambda: self._ipc_reason(tensors),
                                                self._shm_reason, streams_reason)
        return self.last_transport.transport

    def _stream(self, rpc: str, header, tensors, timeout, outputs, transport="grpc", into=None):
        """Send a header and tensors on the streaming RPC `rpc`, or (transport shm) place them and the outputs
        (the TensorInfos outputs() returns) in shared memory; (output tensors by name, Summary). into: as _collect's."""
        request_type, response_type = STREAMS[rpc]
        if transport in ("shm", "ipc"):
            try:
                outputs = outputs()
            except (ValueError, IndexError) as exc:  # a shape the server would refuse: the same status
                raise QuantdError(grpc.StatusCode.INVALID_ARGUMENT, f"{rpc}: {exc}") from None

            def send(deadline):
                return lambda h: self._in_memory(rpc, h, deadline)
            if transport == "ipc" and self._ipc is None:
                self._ipc = transports.IpcTransport(self._shm)
            memory = self._shm if transport == "shm" else self._ipc
            tensors = [t.detach() for t in tensors]
            out, summary = self._call(lambda deadline: memory.call_with(send(deadline), header, tensors, outputs),
                                      timeout)
        else:
            tensors = [t.detach().cpu() for t in tensors]

            def attempt(deadline):
                requests = _requests(request_type, header, tensors, self.chunk_bytes, self.checksums)
                call = self.streams[rpc](requests, timeout=deadline)
                return _collect(_watched(call, self.stall_timeout), response_type, self.checksums, into)
            out, summary = self._call(attempt, timeout)
        self.last_placement = summary.placement
        return out, summary

    def _in_memory(self, rpc: str, header, deadline) -> pb.Summary:
        """The Summary of `rpc` on a header whose tensors are in memory: on the server's local socket, else by its
        unary form, or by the stream where the server predates that (UNIMPLEMENTED, remembered)."""
        connection = self._local_connection()
        if connection is not None:
            self.last_transport = dataclasses.replace(self.last_transport, via="local socket")
            try:
                return connection.call(rpc, header, deadline)
            except LocalSocketError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or local.BUSY not in exc.details():
                    raise
                connection.close()  # the server serves its bound of connections and closed this one: use gRPC
            finally:
                if connection.sock is not None and self._local_path:
                    self._local_idle.append(connection)
                else:
                    connection.close()
        self.last_transport = dataclasses.replace(self.last_transport, via="grpc")
        if self._unary_in_memory:
            try:
                return getattr(self.stub, f"{rpc}InMemory")(header, timeout=deadline)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._unary_in_memory = False
        request_type, response_type = STREAMS[rpc]
        return _summary(self.streams[rpc](iter([request_type(header=header)]), timeout=deadline), response_type)

    def _local_connection(self) -> LocalSocket | None:
        """An idle connection to the server's local socket, or a new one; None where there is none (why: in
        local_socket_reason), and memory calls go through gRPC."""
        try:
            return self._local_idle.pop()
        except IndexError:
            pass
        if not self._local_path:
            return None
        try:
            return LocalSocket(self._local_path)
        except OSError as exc:  # another host's path, a server in another container, another user's socket
            self.local_socket_reason = f"cannot connect to the server's local socket {self._local_path}: {exc}"
            self._local_path = None
            return None

    def quantize(self, tensor, spec: QuantSpec | None = None, *, report: bool = True, dequantized: bool = False,
                 scales=None, amax: bool = False, timeout: float | None = None,
                 transport: str | None = None) -> QuantizeResult:
        """Quantize a bf16/fp16/fp32 tensor with `spec` (default QuantSpec()); the result is bit-identical
        to quantd.kernels.quantize(tensor, spec, scales=scales) and sits on the tensor's device.

        scales: explicit scales (a tensor or number of spec.scale_shape elements) instead of the tensor's own;
        amax: also return the input's largest finite |x| (QuantizeResult.amax): with AmaxHistory, delayed scaling."""
        x = wire.as_torch(tensor)
        spec = spec or QuantSpec()
        scales = None if scales is None else torch.as_tensor(scales, dtype=torch.float32).cpu()

        def streams_reason():
            if self.parallel_streams < 2:
                return "parallel_streams is 1"
            if report or dequantized:
                return "report and dequantized need the whole tensor in one call"
            if x.dim() == 0 or unit_shape(spec, tuple(x.shape)) is None:
                return f"{spec.describe()} needs the whole tensor for its scales"
            if scales is not None and scales.numel() != math.prod(spec.scale_shape(tuple(x.shape))):
                return "the explicit scales do not fit the tensor's blocks (the server says why)"
            return None
        chosen = self._choose(transport, [x], streams_reason)
        if chosen == "streams":
            return self._quantize_streams(x, spec, scales, amax, timeout)
        header = self._quantize_header(x, spec, scales, amax, report=report, dequantized=dequantized)
        outputs = lambda: wire.quantize_outputs(spec, tuple(x.shape), dequantized)  # noqa: E731
        out, summary = self._stream("Quantize", header, [x], timeout, outputs, chosen)
        out = {name: t.to(x.device) for name, t in out.items()}
        dequantized = out.pop("dequantized", None)
        return QuantizeResult(**out, spec=spec, shape=tuple(x.shape), report=as_dict(summary.report) if report else None,
                              dequantized=dequantized, transport=self.last_transport,
                              amax=summary.amax if summary.HasField("amax") else None)

    def _quantize_header(self, x, spec, scales, amax: bool, report=False, dequantized=False) -> pb.QuantizeHeader:
        return pb.QuantizeHeader(tensor=wire.tensor_info("input", x.dtype, x.shape), spec=wire.spec_to_proto(spec),
                                 return_dequantized=dequantized, return_report=report,
                                 chunk_bytes=self.chunk_bytes, checksums=self.checksums,
                                 scales=[] if scales is None else scales.reshape(-1).tolist(), return_amax=amax)

    def _quantize_streams(self, x: torch.Tensor, spec: QuantSpec, scales, amax: bool, timeout) -> QuantizeResult:
        """Quantize independent pieces of x on parallel_streams connections of as many worker processes at once."""
        if self._workers is not None and self._workers.n != self.parallel_streams:
            self._workers.close()
            self._workers = None
        if self._workers is None:
            from .streams import StreamWorkers  # it imports this module
            self._workers = StreamWorkers(self.parallel_streams, self._settings)
        regions = self._shm.user_regions if self._shm is not None else ()
        stored, found = self._workers.quantize(x.detach().cpu().contiguous(), spec, scales, amax, timeout, regions)
        return QuantizeResult(**{name: t.to(x.device) for name, t in stored.items()}, spec=spec, shape=tuple(x.shape),
                              transport=self.last_transport, amax=found)

    def _quantize_into(self, x: torch.Tensor, spec: QuantSpec, into, *, scales, amax: bool, timeout):
        """Quantize x on one stream, its outputs written into into(TensorInfo) (a streams worker's piece); the amax."""
        _, summary = self._stream("Quantize", self._quantize_header(x, spec, scales, amax), [x], timeout, None,
                                  into=into)
        return summary.amax if summary.HasField("amax") else None

    def dequantize(self, qt: QuantizedTensor, out_dtype: torch.dtype | None = None, *,
                   timeout: float | None = None, transport: str | None = None) -> torch.Tensor:
        """The high-precision tensor of `qt` (in out_dtype, default qt.spec.out_dtype), on qt.codes' device."""
        header = pb.DequantizeHeader(operand=wire.quantized_operand(qt), chunk_bytes=self.chunk_bytes,
                                     checksums=self.checksums)
        if out_dtype is not None:
            header.out_dtype = wire.dtype_name(out_dtype)
        outputs = lambda: [wire.tensor_info("output", out_dtype or qt.spec.dequant_dtype, qt.shape)]  # noqa: E731
        tensors = wire.operand_tensors(qt)
        out, _ = self._stream("Dequantize", header, tensors, timeout, outputs, self._choose(transport, tensors))
        return out["output"].to(qt.codes.device)

    def matmul(self, a, b, *, a_spec: QuantSpec | None = None, b_spec: QuantSpec | None = None,
               out_dtype: torch.dtype = torch.bfloat16, timeout: float | None = None,
               transport: str | None = None) -> torch.Tensor:
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
        shapes = [op.shape if isinstance(op, QuantizedTensor) else wire.as_torch(op).shape for op in (a, b)]
        outputs = lambda: [wire.tensor_info("output", out_dtype, [shape[0] for shape in shapes])]  # noqa: E731
        out, _ = self._stream("Matmul", header, tensors, timeout, outputs, self._choose(transport, tensors))
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

    def shm_tensor(self, shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A CPU tensor in shared memory registered with the server: passed to a call with transport shm (or auto),
        it is read where it is, without a copy. Its memory lives until close(). QuantdError when the server cannot
        share memory with this client (another host)."""
        reason = self._shm_reason()
        if reason is not None:
            raise QuantdError(grpc.StatusCode.FAILED_PRECONDITION, f"no shared memory with the server: {reason}")
        return self._shm.tensor(shape, dtype)

    def region_status(self) -> dict:
        """This client's shared-memory regions on the server, how many the server holds in all, and how many CUDA
        IPC storages it keeps open for this client."""
        if self._shm is None:
            return {"regions": [], "server_regions": 0, "kept_storages": 0}
        return as_dict(self._call(lambda _: self._shm.status(), None))

    def server_info(self, *, timeout: float | None = None) -> dict:
        """Version, backend, device, supported formats and limits of the server answering."""
        info = self._call(lambda deadline: self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=deadline), timeout)
        return as_dict(info)
