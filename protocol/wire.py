"""How quantd's objects travel: QuantSpec <-> proto, tensors <-> bytes, dtype names.

Server and client both use these converters, so QuantSpec (quantd.kernels.spec) stays the
one description of a spec; the proto message mirrors its fields by name.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import torch

from quantd.kernels.spec import QuantizedTensor, QuantSpec, Storage
from quantd.v1 import quantd_pb2 as pb

# Measured with benchmarks/service.py (BENCHMARKS.md, "Service"): Python gRPC moves the most bytes per
# second with messages of a few MiB; 64 KiB messages reach a third of it, larger ones only add latency.
DEFAULT_CHUNK_BYTES = 4 << 20

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e8m0fnu, torch.int8, torch.uint8)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a wire name; ValueError naming the choices for an unknown one."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {', '.join(DTYPES)})")
    return DTYPES[name]


# ---- QuantSpec ------------------------------------------------------------------------

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))


def spec_to_proto(spec: QuantSpec) -> pb.QuantSpec:
    """Every field of `spec`, explicitly set."""
    msg = pb.QuantSpec()
    for name in SPEC_FIELDS:
        value = getattr(spec, name)
        if name == "tile":
            msg.tile.extend(int(t) for t in value)
        else:
            setattr(msg, name, value.value if isinstance(value, enum.Enum) else value)
    return msg


def spec_from_proto(msg: pb.QuantSpec) -> QuantSpec:
    """QuantSpec of a proto message; unset fields take QuantSpec's defaults. ValueError if invalid."""
    kwargs = {}
    for name in SPEC_FIELDS:
        if name == "tile":
            if msg.tile:
                kwargs["tile"] = tuple(msg.tile)
        elif name == "format" or msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return QuantSpec(**kwargs)


# ---- tensors --------------------------------------------------------------------------


def tensor_info(name: str, dtype: torch.dtype, shape) -> pb.TensorInfo:
    return pb.TensorInfo(name=name, dtype=dtype_name(dtype), shape=[int(s) for s in shape])


def info_nbytes(info: pb.TensorInfo) -> int:
    """Byte size an info declares; ValueError for an unknown dtype, a negative dim or a size past 64 bits."""
    itemsize = dtype_from_name(info.dtype).itemsize
    shape = tuple(info.shape)
    if shape and min(shape) < 0:
        raise ValueError(f"tensor {info.name!r}: negative dimension in shape {list(shape)}")
    nbytes = math.prod(shape) * itemsize
    nonzero = math.prod(s for s in shape if s) * itemsize if nbytes == 0 else nbytes
    if nonzero >= 1 << 63:  # what torch would refuse to allocate
        raise ValueError(f"tensor {info.name!r}: shape {list(shape)} is too large (its size overflows 64 bits)")
    return nbytes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in C order, without a copy when it is already contiguous."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def tensor_from_buffer(buf: torch.Tensor, info: pb.TensorInfo) -> torch.Tensor:
    """View a uint8 buffer as the tensor `info` describes (no copy)."""
    return buf.view(dtype_from_name(info.dtype)).reshape(tuple(info.shape))


def as_torch(x) -> torch.Tensor:
    """A torch tensor of a torch tensor or numpy array (ml_dtypes bfloat16 arrays included); no copy on CPU."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes: numpy itself has no bf16
            return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def quantize_outputs(spec: QuantSpec, shape, dequantized: bool) -> list:
    """The tensors a Quantize answers with, in order: codes, scales, [zero_points], [tensor_scale], [dequantized]."""
    outputs = [tensor_info(name, dtype, tshape) for name, tshape, dtype in spec.storage(shape).tensors()]
    if dequantized:
        outputs.append(tensor_info("dequantized", spec.dequant_dtype, shape))
    return outputs


def quantized_operand(qt: QuantizedTensor) -> pb.QuantizedOperand:
    """The header describing a QuantizedTensor's stored tensors (codes, scales, zero points, tensor scale)."""
    msg = pb.QuantizedOperand(spec=spec_to_proto(qt.spec), shape=[int(s) for s in qt.shape])
    for name, t in qt.stored().items():
        getattr(msg, name).CopyFrom(tensor_info(name, t.dtype, t.shape))
    return msg


def operand_tensors(qt: QuantizedTensor) -> list:
    """A QuantizedTensor's tensors in stream order."""
    return list(qt.stored().values())


def operand_infos(msg: pb.QuantizedOperand) -> list:
    """The TensorInfos an operand message names, in stream order (Storage's)."""
    return [getattr(msg, name) for name in Storage._fields if msg.HasField(name)]


def operand_names(msg: pb.QuantizedOperand) -> list:
    return [name for name in Storage._fields if msg.HasField(name)]
