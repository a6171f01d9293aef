"""The quantd.v1.Quantd servicer: each method reads like the protocol it serves.

No numerics here: the kernels (quantd.kernels.dispatch) compute off the event loop, in a
small thread pool, so the server keeps serving while a tensor is being quantized (CUDA IPC calls
on the GPU that holds their tensors launch their kernels from the loop and poll for them).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import secrets
import time
from importlib import metadata

import grpc
import torch

from quantd.kernels import dispatch, reference
from quantd.kernels.spec import (INPUT_DTYPES, OUT_DTYPES, Format, Granularity, QuantizedTensor,
                                 QuantSpec, ScaleEncoding)
from quantd.protocol import wire
from quantd.protocol.pieces import join_pieces, piece_scales, plan_pieces
from quantd.v1 import quantd_pb2 as pb
from quantd.v1 import quantd_pb2_grpc

from . import cuda_ipc, replay
from .errors import ServiceError, grpc_status, invalid
from .pipeline import DeviceInput, quantize_host_pieces
from .placement import Placement
from .regions import RegionTable
from .streams import MIN_CHUNK_BYTES, MemoryBudget, OutputSender, StagingPool, StreamAssembler, StreamMemory, chunks_of

PADDING_ALLOWANCE = 1 << 20  # elements of padding any tensor may have, beyond its own size


def check_input_info(info: pb.TensorInfo, spec: QuantSpec, what: str) -> None:
    """ValueError unless `info` is a bf16/fp16/fp32 tensor `spec` can quantize."""
    dtype = wire.dtype_from_name(info.dtype)
    if dtype not in INPUT_DTYPES:
        raise invalid(f"{what}: dtype {info.dtype} cannot be quantized (expected bfloat16, float16 or float32)")
    wire.info_nbytes(info)
    check_blocks(spec, tuple(info.shape), what)


def check_blocks(spec: QuantSpec, shape: tuple, what: str) -> None:
    """INVALID_ARGUMENT unless `spec` can block a tensor of `shape` without padding it past twice its size (plus
    PADDING_ALLOWANCE elements): a group, tile or flat block far larger than the tensor would have the kernels
    fill and scan gigabytes of padding for a few bytes of input."""
    spec.check_shape(shape)
    numel = math.prod(shape)
    padded = numel
    if spec.granularity in (Granularity.GROUP, Granularity.TILE, Granularity.FLAT):
        padded = math.prod(spec.scale_shape(shape)) * math.prod(spec.block_shape)
    if padded > 2 * numel + PADDING_ALLOWANCE:
        raise invalid(f"{what}: {spec.describe()} blocks would pad a {list(shape)} tensor to {padded} elements; "
                      f"use blocks no larger than the tensor")


def check_quantized_operand(msg: pb.QuantizedOperand, what: str) -> QuantSpec:
    """The operand's spec, after checking its tensors' dtypes and shapes against it."""
    spec = wire.spec_from_proto(msg.spec)
    shape = tuple(msg.shape)
    if any(s < 0 for s in shape):
        raise invalid(f"{what}: negative dimension in shape {list(shape)}")
    check_blocks(spec, shape, what)
    expected = spec.storage(shape).tensors()
    extra = [name for name in wire.operand_names(msg) if name not in {name for name, *_ in expected}]
    if extra:
        raise invalid(f"{what}: {extra[0]} given, but {spec.describe()} has none (zero_points: int8_asym only; "
                      f"tensor_scale: nvfp4 only)")
    for name, want_shape, dtype in expected:
        if not msg.HasField(name):
            raise invalid(f"{what}: {name} missing ({spec.describe()} needs them)")
        info = getattr(msg, name)
        if info.dtype != wire.dtype_name(dtype):
            raise invalid(f"{what}: dtype mismatch: {name} are {info.dtype}, {spec.describe()} stores {wire.dtype_name(dtype)}")
        if tuple(info.shape) != tuple(want_shape):
            raise invalid(f"{what}: bad shape: {name} have shape {list(info.shape)}, {spec.describe()} of a "
                          f"{list(shape)} tensor has {list(want_shape)}")
    return spec


def quantized_tensor(msg: pb.QuantizedOperand, tensors: list, device) -> QuantizedTensor:
    spec = wire.spec_from_proto(msg.spec)
    return QuantizedTensor.from_stored({name: t.to(device) for name, t in zip(wire.operand_names(msg), tensors)},
                                       spec, msg.shape)


def given_scales(header: pb.QuantizeHeader, spec: QuantSpec, shape: tuple) -> torch.Tensor | None:
    """The header's explicit scales as fp32 of reference.given_scale_shape, or None; INVALID_ARGUMENT for scales that
    tensor cannot take (count, sign, pow2)."""
    if not header.scales:
        return None
    scales = torch.tensor(header.scales, dtype=torch.float32)
    try:
        reference.check_scales(scales, spec, shape)
    except ValueError as exc:
        raise invalid(f"Quantize: {exc}") from None
    return scales.reshape(reference.given_scale_shape(spec, shape))


def quantize_amax(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None, want_amax: bool,
                  out: QuantizedTensor | None = None):
    """(the QuantizedTensor of x, its amax when `want_amax` else None), with explicit `scales` when given; written
    into `out` when given. The scales stay on the host, where they were checked: the kernels copy them over
    without waiting for the GPU's queue."""
    if want_amax:
        return dispatch.quantize_with_amax(x, spec, scales=scales, out=out)
    return dispatch.quantize(x, spec, scales=scales, out=out), None


INSTANCE = secrets.token_hex(8)  # this process, as ServerInfo.instance names it


def in_memory(header) -> bool:
    """True when a request's tensors are in shared-memory regions or GPU memory rather than in its stream."""
    return header.HasField("regions") or header.HasField("cuda")


def package_version() -> str:
    try:
        return metadata.version("quantd")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def out_dtype_name(name: str, rpc: str) -> str:
    """`name` if it is an output dtype quantd writes; INVALID_ARGUMENT naming the choices otherwise."""
    if name not in OUT_DTYPES:
        raise invalid(f"{rpc}: out_dtype {name!r} is not one of {', '.join(OUT_DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class Call:
    """An admitted stream: the memory it holds, the device it computes on (and that device's threads), and why."""
    memory: StreamMemory
    device: torch.device
    executor: concurrent.futures.Executor
    placement: str


# How long _launch_here polls for a call's kernels before it waits for them in a thread.
POLL_SECONDS = 0.002


class QuantdServicer(quantd_pb2_grpc.QuantdServicer):
    """Serves on `devices` (one, or a pool of GPUs), each computing in its own executor."""

    def __init__(self, config, devices: list, executors: list, metrics=None):
        self.config = config
        self.devices = list(devices)
        self.device = self.devices[0]
        self.executors = list(executors)
        self.metrics = metrics
        self.active_streams = 0
        self.draining = False
        # pinned host memory is pinned for every GPU of the process: one pool and one region table serve them all
        self.pool = StagingPool(config.staging_pool_bytes, pin=self.device.type == "cuda")
        self.budget = MemoryBudget(config.memory_budget)
        self.regions = RegionTable(pin=self.device.type == "cuda", allow_unsealed=config.shm_unsealed == "allow")
        self.placement = Placement([str(d) for d in self.devices])
        self.uuids = [cuda_ipc.device_uuid(d) for d in self.devices]
        if metrics is not None:
            metrics.watch_devices(self.placement)
        self.sessions_end = asyncio.Event()  # set when the server stops: open sessions end
        self.local_socket = ""  # the path of this process's local socket (server.local), once it listens
        self.streams: dict = {}  # device -> the CUDA stream of the calls launched from the event loop (_launch_here)

    # ---- helpers ------------------------------------------------------------------------
    async def _header(self, requests, request_type):
        """(header, chunks) of a request stream, the header's first message awaited at most stream_idle_seconds."""
        return await chunks_of(requests, request_type, idle_seconds=self.config.stream_idle_seconds,
                               max_message_bytes=self.config.max_message_bytes)

    @contextlib.asynccontextmanager
    async def _admitted(self, header, inputs: list, outputs: list, working_bytes: int = 0):
        """Admission of a stream whose header has arrived: RESOURCE_EXHAUSTED for inputs or outputs over
        max_tensor_bytes, then _holding its tensors' bytes and `working_bytes`."""
        sizes = {}
        for what, infos in (("declares", inputs), ("would return", outputs)):
            sizes[what] = sum(wire.info_nbytes(info) for info in infos)
            if sizes[what] > self.config.max_tensor_bytes:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the stream {what} {sizes[what]} bytes of tensors, over this server's limit of "
                                   f"{self.config.max_tensor_bytes} bytes (max_tensor_bytes)")
        uuid = header.cuda.device_uuid if header.HasField("cuda") else None
        async with self._holding(sum(sizes.values()) + working_bytes, uuid) as call:
            yield call

    @contextlib.asynccontextmanager
    async def _holding(self, nbytes: int, uuid: str | None):
        """A stream of `nbytes` (tensors and working memory) admitted: UNAVAILABLE while draining;
        RESOURCE_EXHAUSTED over the stream count, or when `nbytes` do not fit in the memory budget. Yields its Call
        (placed on the GPU `uuid` of its CUDA IPC tensors when that is one of the server's, else on the least
        loaded device); its memory is closed when the call ends, however it ends."""
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down (draining); retry on another replica")
        if self.active_streams >= self.config.max_concurrent_streams:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many concurrent streams: this server serves {self.config.max_concurrent_streams} at once")
        memory = StreamMemory(self.budget, self.pool, nbytes)
        self.active_streams += 1
        if self.metrics is not None:
            self.metrics.stream_started()
        try:
            with self.placement.hold(nbytes, self.uuids.index(uuid) if uuid in self.uuids else None) as placed:
                try:
                    yield Call(memory, self.devices[placed.index], self.executors[placed.index],
                               f"{self.devices[placed.index]} ({placed.reason})")
                finally:
                    await memory.close()
        finally:
            self.active_streams -= 1
            if self.metrics is not None:
                self.metrics.stream_finished()

    async def _compute(self, call: Call, rpc: str, fn, *args):
        """Run fn(*args) in the call's device's threads, with that device current; record its time. The call's
        memory keeps the stream's buffers until it is done."""
        def timed():
            started = time.perf_counter()
            if call.device.type == "cuda":
                with torch.cuda.device(call.device):
                    result = fn(*args)
                    torch.cuda.current_stream(call.device).synchronize()
            else:
                result = fn(*args)
            if self.metrics is not None:
                self.metrics.observe_kernel_seconds(rpc, time.perf_counter() - started)
            return result
        future = call.executor.submit(timed)
        call.memory.track(future)
        return await asyncio.wrap_future(future)

    async def _launch_here(self, call: Call, rpc: str, fn):
        """fn() for a call whose work is kernels on its device alone (CUDA IPC tensors on the GPU it computes on):
        launched from the event loop on a stream kept for such calls, then waited for by polling an event for up to
        POLL_SECONDS, and in the device's threads past that. A hand-over to a thread and back costs more than the
        kernels of a small call. A call ended meanwhile leaves the wait to those threads, so that its memory is
        released only once the kernels are done with it."""
        started = time.perf_counter()
        stream = self.streams.get(call.device)
        if stream is None:
            stream = self.streams[call.device] = torch.cuda.Stream(call.device)
        with torch.cuda.device(call.device), torch.cuda.stream(stream):
            try:
                result = fn()
            except BaseException:  # kernels it launched may still run on the call's memory
                call.memory.track(call.executor.submit(stream.record_event().synchronize))
                raise
            done = stream.record_event()
        try:
            while not done.query():
                if time.perf_counter() - started > POLL_SECONDS:
                    await asyncio.wrap_future(call.executor.submit(done.synchronize))
                    break
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            call.memory.track(call.executor.submit(done.synchronize))
            raise
        if self.metrics is not None:
            self.metrics.observe_kernel_seconds(rpc, time.perf_counter() - started)
        return result

    async def replay(self, plan: replay.Plan, kept: cuda_ipc.Kept) -> None:
        """Serve a call again from its plan (server.replay): admitted as it was, its kernels launched again."""
        offer = plan.offer
        async with self._holding(offer.nbytes, offer.header.cuda.device_uuid) as call:
            kept.touch(plan.keys)
            await self._launch_here(call, offer.rpc, plan.run)
        if self.metrics is not None:
            self.metrics.replayed(offer.rpc, plan.graph is not None)

    async def _receive(self, chunks, assembler: StreamAssembler, on_progress=None):
        async for chunk in chunks:
            index, nbytes = await assembler.add(chunk)
            if self.metrics is not None:
                self.metrics.add_bytes("in", nbytes)
            if on_progress is not None:
                on_progress(index)
        assembler.check_complete()

    def _memory(self, header, input_infos, output_infos):
        """A context holding (input tensors, output byte views) of a request whose tensors are in shared-memory
        regions or in the client's GPU memory."""
        if header.HasField("regions"):
            return self.regions.use(header.regions, input_infos, output_infos)
        return contextlib.nullcontext(cuda_ipc.open_tensors(header.cuda, input_infos, output_infos, self.device,
                                                            self.regions))

    async def _memory_call(self, call: Call, rpc: str, header, input_infos, sender, fn, from_host=None,
                           reads_back: bool = False):
        """Serve a request whose tensors are in shared or GPU memory: fn(input tensors, output views or None) ->
        (output tensors, the Summary's other fields as OutputSender.summary takes them) runs in the compute pool (or
        on the loop: below) and its outputs are written where the request says; the header and summary go back.
        Where the outputs are on the device the call computes on, fn is given their views and may write outputs
        there itself (None in their place in its results). CUDA IPC tensors on a GPU the call does not compute on
        cross GPUs (cuda_ipc.Crossing says how). from_host(host inputs, output views) -> fields: a way that writes the outputs
        itself, for inputs in host memory computed on a GPU (None: fn). A call on the GPU that holds its CUDA IPC
        tensors launches its kernels from the event loop (_launch_here) unless fn `reads_back` results to the host
        (a report), which would hold the loop until its kernels are done."""
        with self._memory(header, input_infos, sender.infos) as (inputs, outputs):
            crossing = cuda_ipc.Crossing(inputs[0].device, call.device)
            if crossing.reason:
                sender.placement += f"; {crossing.reason}"
                crossing.log()

            direct = crossing.how == "local" and all(v.device == call.device for v in outputs)

            def compute():
                if from_host is not None and inputs[0].device.type == "cpu" and call.device.type == "cuda":
                    return from_host(inputs, outputs)
                results, fields = fn([crossing.to_compute(t) for t in inputs], outputs if direct else None)
                for view, result in zip(outputs, results):
                    if result is not None:
                        crossing.write(view, result.reshape(-1).view(torch.uint8))
                crossing.finish()
                return fields
            here = direct and inputs[0].device == call.device and call.device.type == "cuda" and not reads_back
            computing = asyncio.ensure_future(self._launch_here(call, rpc, compute) if here else
                                              self._compute(call, rpc, compute))  # while the header goes out
            try:
                yield sender.header()
                fields = await computing
            finally:  # the call may have ended first: its regions stay in use (mapped, pinned) until the thread is done
                computing.cancel()
                await call.memory.settled()
            offers = replay.offers.get()
            if here and offers is not None and all(t.kept for t in header.cuda.inputs) and \
                    all(t.kept for t in header.cuda.outputs) and all(v is None for v in fields.values()):
                offers.append(replay.Offer(rpc, header, call.memory.nbytes, compute))
        yield sender.summary(written=[view.numel() for view in outputs], **fields)

    def _sender(self, response_type, infos, chunk_bytes: int, checksums: bool) -> OutputSender:
        """The sender of a response; INVALID_ARGUMENT for a chunk_bytes outside MIN_CHUNK_BYTES..max_message_bytes
        (0 takes the server's chunk_bytes)."""
        if chunk_bytes and not MIN_CHUNK_BYTES <= chunk_bytes <= self.config.max_message_bytes:
            raise invalid(f"chunk_bytes {chunk_bytes} is out of range: 0 (the server's default) or "
                          f"{MIN_CHUNK_BYTES}..{self.config.max_message_bytes}")
        return OutputSender(response_type, infos, chunk_bytes=chunk_bytes or self.config.chunk_bytes,
                            checksums=checksums, metrics=self.metrics)

    # ---- RPCs -----------------------------------------------------------------------------
    @grpc_status
    async def Quantize(self, request_iterator, context):
        header, chunks = await self._header(request_iterator, pb.QuantizeRequest)
        async for message in self._quantize(header, chunks):
            yield message

    async def _quantize(self, header, chunks):
        """Quantize's responses to `header` and its chunks (None for a header whose tensors are in memory)."""
        spec = wire.spec_from_proto(header.spec)
        info = header.tensor
        check_input_info(info, spec, "Quantize")
        dtype, shape = wire.dtype_from_name(info.dtype), tuple(info.shape)
        outputs = wire.quantize_outputs(spec, shape, header.return_dequantized)
        sender = self._sender(pb.QuantizeResponse, outputs, header.chunk_bytes, header.checksums)
        scales = given_scales(header, spec, shape)
        async with self._admitted(header, [info], outputs) as call:
            sender.placement = call.placement
            if in_memory(header):
                def quantize(inputs, views=None):
                    out = None if views is None else QuantizedTensor.from_stored(
                        {o.name: wire.tensor_from_buffer(v, o) for v, o in zip(views, outputs)
                         if o.name != "dequantized"}, spec, shape)
                    qt, amax = quantize_amax(inputs[0], spec, scales, header.return_amax, out)
                    dequantized = [dispatch.dequantize(qt)] if header.return_dequantized else []
                    written = [None] * len(qt.stored()) if out is not None else wire.operand_tensors(qt)
                    results = written + dequantized
                    report = reference.report(inputs[0], qt) if header.return_report else None
                    return results, dict(report=report, amax=amax)

                pieces = plan_pieces(spec, shape, self.config.piece_bytes, dtype.itemsize)
                per_piece = piece_scales(pieces, spec, scales)

                def in_pieces(inputs, outputs):  # copies in and out overlap the quantizing of other pieces
                    def piece(i, x):
                        qt, amax = quantize_amax(x, spec, per_piece[i], header.return_amax)
                        return wire.operand_tensors(qt), amax
                    amaxes = quantize_host_pieces(inputs[0], outputs, pieces, call.device, piece)
                    return dict(report=None, amax=torch.stack(amaxes).amax() if header.return_amax else None)
                whole = len(pieces) == 1 or header.return_dequantized or header.return_report
                async for message in self._memory_call(call, "Quantize", header, [info], sender, quantize,
                                                       None if whole else in_pieces, reads_back=header.return_report):
                    yield message
                return
            assembler = call.memory.assembler([info])
            yield sender.header()

            x = DeviceInput(dtype, shape, call.device)
            keep = header.return_report or header.return_dequantized
            parts = []  # device-side piece results, kept only when the whole result is needed again
            amax = None  # the largest of the pieces' amax: exactly the whole tensor's
            async for qt, host, piece_amax in self._quantize_pieces(call, spec, x, chunks, assembler, scales,
                                                                    header.return_amax):
                if keep:
                    parts.append(qt)
                if piece_amax is not None:
                    amax = piece_amax if amax is None else torch.maximum(amax, piece_amax)
                for index, tensor in enumerate(host):
                    async for message in sender.send(index, tensor):
                        yield message
            report = None
            if keep:
                whole = join_pieces(parts, spec, shape)
                if header.return_dequantized:
                    deq = await self._compute(call, "Quantize", lambda: dispatch.dequantize(whole).cpu())
                    async for message in sender.send(len(outputs) - 1, deq):
                        yield message
                if header.return_report:
                    report = await self._compute(call, "Quantize", reference.report, x.whole(), whole)
            yield sender.summary(report, amax=amax)

    async def _quantize_pieces(self, call: Call, spec: QuantSpec, x: DeviceInput, chunks,
                               assembler: StreamAssembler, scales: torch.Tensor | None, want_amax: bool):
        """(QuantizedTensor on the device, its tensors on the host, its amax if `want_amax`) of each piece of the
        input, in order, each computed as soon as its bytes have arrived (with its part of explicit `scales`)."""
        itemsize = x.dtype.itemsize
        pieces = plan_pieces(spec, x.shape, self.config.piece_bytes, itemsize)
        per_piece = piece_scales(pieces, spec, scales)
        pending: asyncio.Queue = asyncio.Queue()
        scheduled = 0

        def quantize(i):
            qt, amax = quantize_amax(x.piece(pieces[i]), spec, per_piece[i], want_amax)
            return qt, [t.cpu() for t in wire.operand_tensors(qt)], amax

        def schedule(_index=0):
            nonlocal scheduled
            arrived = assembler.received[0] // itemsize
            while scheduled < len(pieces) and pieces[scheduled].end <= arrived:
                x.stage(assembler.buffer(0))
                pending.put_nowait(asyncio.ensure_future(self._compute(call, "Quantize", quantize, scheduled)))
                scheduled += 1

        async def receive():
            try:
                await self._receive(chunks, assembler, schedule)
                schedule()
                pending.put_nowait(None)
            except Exception as exc:  # noqa: BLE001 (handed to the sending side, which maps it)
                pending.put_nowait(exc)

        receiver = asyncio.ensure_future(receive())
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield await item
        finally:
            receiver.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()

    @grpc_status
    async def Dequantize(self, request_iterator, context):
        header, chunks = await self._header(request_iterator, pb.DequantizeRequest)
        async for message in self._dequantize(header, chunks):
            yield message

    async def _dequantize(self, header, chunks):
        """Dequantize's responses to `header` and its chunks (None for a header whose tensors are in memory)."""
        spec = check_quantized_operand(header.operand, "Dequantize")
        out_name = out_dtype_name(header.out_dtype if header.HasField("out_dtype") else spec.out_dtype, "Dequantize")
        infos = wire.operand_infos(header.operand)
        output = wire.tensor_info("output", OUT_DTYPES[out_name], header.operand.shape)
        sender = self._sender(pb.DequantizeResponse, [output], header.chunk_bytes, header.checksums)
        async with self._admitted(header, infos, [output]) as call:
            def dequantize(tensors, out=None):
                return dispatch.dequantize(quantized_tensor(header.operand, tensors, call.device), OUT_DTYPES[out_name],
                                           out=out)
            async for message in self._serve_one_output(call, "Dequantize", header, infos, chunks, sender,
                                                        dequantize, writes_out=True):
                yield message

    @grpc_status
    async def Matmul(self, request_iterator, context):
        header, chunks = await self._header(request_iterator, pb.MatmulRequest)
        async for message in self._matmul(header, chunks):
            yield message

    async def _matmul(self, header, chunks):
        """Matmul's responses to `header` and its chunks (None for a header whose tensors are in memory)."""
        out_name = out_dtype_name(header.out_dtype or "bfloat16", "Matmul")
        shapes, infos = [], []
        for name in ("a", "b"):
            operand = getattr(header, name)
            kind = operand.WhichOneof("kind")
            if kind == "tensor":
                check_input_info(operand.tensor.tensor, wire.spec_from_proto(operand.tensor.spec), f"Matmul {name.upper()}")
                shapes.append(tuple(operand.tensor.tensor.shape))
                infos.append([operand.tensor.tensor])
            elif kind == "quantized":
                check_quantized_operand(operand.quantized, f"Matmul {name.upper()}")
                shapes.append(tuple(operand.quantized.shape))
                infos.append(wire.operand_infos(operand.quantized))
            else:
                raise invalid(f"Matmul: operand {name.upper()} missing")
        (a_shape, b_shape) = shapes
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[1]:
            raise invalid(f"Matmul: bad shape: expected A (M, K) and B (N, K), got {list(a_shape)} and {list(b_shape)}")
        output = wire.tensor_info("output", OUT_DTYPES[out_name], (a_shape[0], b_shape[0]))
        sender = self._sender(pb.MatmulResponse, [output], header.chunk_bytes, header.checksums)
        # the CPU GEMM is the reference's: both operands and the product in fp64
        (m, k), n = a_shape, b_shape[0]
        working = 8 * (m * n + (m + n) * k) if self.device.type == "cpu" else 0
        async with self._admitted(header, infos[0] + infos[1], [output], working) as call:
            def operand(msg, tensors) -> QuantizedTensor:
                if msg.WhichOneof("kind") == "tensor":
                    return dispatch.quantize(tensors[0].to(call.device), wire.spec_from_proto(msg.tensor.spec))
                return quantized_tensor(msg.quantized, tensors, call.device)

            def matmul(tensors):
                split = len(infos[0])
                a, b = operand(header.a, tensors[:split]), operand(header.b, tensors[split:])
                return dispatch.matmul(a, b, OUT_DTYPES[out_name])
            async for message in self._serve_one_output(call, "Matmul", header, infos[0] + infos[1], chunks,
                                                        sender, matmul):
                yield message

    async def _serve_one_output(self, call: Call, rpc: str, header, infos, chunks, sender, fn, writes_out=False):
        """Serve a call with one output, fn(input tensors) (writes_out: fn(input tensors, out=tensor) can write it
        into a given tensor): from and into shared or GPU memory when the header says so, else receive every
        input's chunks, compute off the event loop, stream the output back, then the summary."""
        sender.placement = call.placement
        if in_memory(header):
            def in_memory_fn(tensors, views):
                if views is None or not writes_out:
                    return [fn(tensors)], {}
                fn(tensors, out=wire.tensor_from_buffer(views[0], sender.infos[0]))
                return [None], {}
            async for message in self._memory_call(call, rpc, header, infos, sender, in_memory_fn):
                yield message
            return
        assembler = call.memory.assembler(infos)
        yield sender.header()
        await self._receive(chunks, assembler)
        out = await self._compute(call, rpc, lambda: fn([assembler.tensor(i) for i in range(len(infos))]).cpu())
        async for message in sender.send(0, out):
            yield message
        yield sender.summary()

    # ---- shared-memory regions ------------------------------------------------------------
    @grpc_status
    async def OpenSession(self, request, context):
        session = self.regions.open_session()
        try:
            yield pb.SessionEvent(session=session)
            await self.sessions_end.wait()  # until the server stops, or the call ends (cancelled: CancelledError)
        finally:
            self.regions.close_session(session)

    @grpc_status
    async def RegisterRegion(self, request, context):
        region = self.regions.register(request.session, request.size, request.nonce, name=request.name,
                                       memfd=request.memfd if request.HasField("memfd") else None)
        return pb.RegisterRegionResponse(region=region.id)

    @grpc_status
    async def UnregisterRegion(self, request, context):
        self.regions.unregister(request.session, request.region)
        return pb.UnregisterRegionResponse()

    @grpc_status
    async def RegionStatus(self, request, context):
        regions = [pb.RegionInfo(region=r.id, name=r.name, size=r.size, pinned=r.pinned)
                   for r in self.regions.status(request.session)]
        kept = self.regions.kept.get(request.session)
        return pb.RegionStatusResponse(regions=regions, server_regions=len(self.regions.regions),
                                       kept_storages=len(kept.storages) if kept else 0)

    @grpc_status
    async def CloseSession(self, request, context):
        self.regions.close_session(request.session, must_be_open=True)
        return pb.CloseSessionResponse()

    async def serve_in_memory(self, rpc: str, header) -> pb.Summary:
        """The unary form of the streaming RPC `rpc` for a header whose tensors are in memory: that RPC served on
        the header alone, its Summary returned (the *InMemory RPCs, and calls on the local socket)."""
        if not in_memory(header):
            raise invalid(f"{rpc}InMemory: the header's tensors must be in shared-memory regions or CUDA memory "
                          f"(its `regions` or `cuda`); send their bytes with {rpc}")
        summary = None
        refused = cuda_ipc.released_if_refused(header.cuda, self.regions) if header.HasField("cuda") else \
            contextlib.nullcontext()
        with refused:
            async for response in getattr(self, f"_{rpc.lower()}")(header, None):
                if response.HasField("summary"):
                    summary = response.summary
        return summary

    @grpc_status
    async def QuantizeInMemory(self, request, context):
        return await self.serve_in_memory("Quantize", request)

    @grpc_status
    async def DequantizeInMemory(self, request, context):
        return await self.serve_in_memory("Dequantize", request)

    @grpc_status
    async def MatmulInMemory(self, request, context):
        return await self.serve_in_memory("Matmul", request)

    @grpc_status
    async def GetServerInfo(self, request, context):
        return self.server_info()

    def server_info(self) -> pb.ServerInfo:
        names = [torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu" for d in self.devices]
        devices = [pb.DeviceInfo(device=load.name, name=name, uuid=uuid, requests_in_flight=load.requests_in_flight,
                                 bytes_in_flight=load.bytes_in_flight, requests_total=load.requests_total)
                   for load, name, uuid in zip(self.placement.loads, names, self.uuids)]
        return pb.ServerInfo(
            version=package_version(),
            backend=dispatch.default_backend(torch.empty(0, device=self.device)),
            device=names[0], devices=devices, ipc_device_uuids=cuda_ipc.visible_gpus(self.device),
            formats=[f.value for f in Format],
            granularities=[g.value for g in Granularity],
            scale_encodings=[e.value for e in ScaleEncoding],
            input_dtypes=[wire.dtype_name(d) for d in INPUT_DTYPES], local_socket=self.local_socket,
            limits=pb.Limits(max_tensor_bytes=self.config.max_tensor_bytes, chunk_bytes=self.config.chunk_bytes,
                             max_message_bytes=self.config.max_message_bytes,
                             max_concurrent_streams=self.config.max_concurrent_streams),
            draining=self.draining, device_uuid=cuda_ipc.device_uuid(self.device), instance=INSTANCE)
