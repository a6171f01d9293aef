"""The vocabulary of quantd: element formats, granularities and the QuantSpec.

Every layer speaks through these objects: the kernels take a QuantSpec, the proto
mirrors it field for field, the server validates it once at its edge and the client
builds it. Nothing else in the code base may restate a format's constants.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import NamedTuple, Optional

import torch


class Format(str, enum.Enum):
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    INT8_SYM = "int8_sym"
    INT8_ASYM = "int8_asym"
    MXFP4 = "mxfp4"
    MXFP8 = "mxfp8"
    NVFP4 = "nvfp4"


class Granularity(str, enum.Enum):
    TENSOR = "tensor"    # one scale for the whole tensor
    CHANNEL = "channel"  # one scale per index of `axis`
    GROUP = "group"      # 1 x group_size groups along the last dim
    TILE = "tile"        # tile[0] x tile[1] tiles over the (rows, last dim) 2-D view
    FLAT = "flat"        # blocks of block_size over the flattened tensor


class ScaleEncoding(str, enum.Enum):
    FP32 = "fp32"  # scale = amax / qmax, a float32
    POW2 = "pow2"  # a power of two stored as E8M0 (UE8M0) bits
    E4M3 = "e4m3"  # an E4M3 value under an fp32 tensor scale (NVFP4)


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """The grid codes live on.

    Minifloats (kind "float") are described by exponent/mantissa widths and bias;
    `max` is the largest finite magnitude, `emax` the exponent of the largest binade
    (the OCP MX `emax_elem`), `emin` the exponent of the smallest normal binade.
    """

    name: str
    kind: str  # "float" or "int"
    bits: int
    max: float
    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    has_nan: bool = False
    code_dtype: torch.dtype = torch.uint8
    nan_code: int = 0  # raw bits written for NaN (when has_nan)

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return int(math.floor(math.log2(self.max)))

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


E4M3 = ElementFormat("e4m3", "float", 8, 448.0, 4, 3, 7, True, torch.float8_e4m3fn, 0x7F)
E5M2 = ElementFormat("e5m2", "float", 8, 57344.0, 5, 2, 15, True, torch.float8_e5m2, 0x7F)
E2M1 = ElementFormat("e2m1", "float", 4, 6.0, 2, 1, 1, False, torch.uint8)
INT8 = ElementFormat("int8", "int", 8, 127.0, code_dtype=torch.int8)

ELEMENTS = {
    Format.FP8_E4M3: E4M3,
    Format.FP8_E5M2: E5M2,
    Format.INT8_SYM: INT8,
    Format.INT8_ASYM: INT8,
    Format.MXFP4: E2M1,
    Format.MXFP8: E4M3,
    Format.NVFP4: E2M1,
}
MX_FORMATS = (Format.MXFP4, Format.MXFP8)
MX_BLOCK = 32
E8M0_BIAS = 127  # E8M0 bits = exponent + 127; 0xFF is NaN and never written
NVFP4_BLOCK = 16
# An NVFP4 block scale that rounds to E4M3 zero is this instead (compressed-tensors' _get_dtype_eps for E4M3).
NVFP4_ZERO_SCALE = 0.125
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Formats defined on one block size with one scale encoding: (group size, scale encoding).
_BLOCK_FORMATS = {Format.MXFP4: (MX_BLOCK, ScaleEncoding.POW2), Format.MXFP8: (MX_BLOCK, ScaleEncoding.POW2),
                  Format.NVFP4: (NVFP4_BLOCK, ScaleEncoding.E4M3)}


def _enum(cls, value, field):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"QuantSpec.{field}: unknown value {value!r} (expected one of {choices})") from None


class Storage(NamedTuple):
    """The tensors a quantized tensor is stored in: (shape, dtype) of its codes, its scales, its zero
    points (int8_asym only, beside the scales; else None) and its tensor scale (nvfp4 only: one fp32; else
    None). Scales are listed in their row-major logical shape whatever their layout. The names are
    QuantizedTensor's attribute names."""
    codes: tuple
    scales: tuple
    zero_points: Optional[tuple] = None
    tensor_scale: Optional[tuple] = None

    def tensors(self) -> list:
        """(name, shape, dtype) of each stored tensor, in the order they travel and are kept."""
        return [(name, *entry) for name, entry in zip(self._fields, self) if entry is not None]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor.

    format        element format of the codes
    granularity   which elements share a scale; its size is given by
                  group_size (group), tile (tile), block_size (flat), axis (channel)
    scale_encoding fp32, or pow2 (E8M0 exponent; for FP8/INT8 rounded up so nothing
                  overflows, for MX formats the OCP rule floor(log2 amax) - emax), or
                  e4m3 (nvfp4 only: E4M3 block scales under one fp32 tensor scale)
    out_dtype     dtype that dequantization produces

    Fields left as None take the format's defaults: MX formats are group 32 with
    pow2 scales, nvfp4 group 16 with e4m3 scales; everything else defaults to 1x128
    groups with fp32 scales. An MX or nvfp4 spec given any other granularity, group
    size (128 included) or scale encoding is refused.
    """

    format: Format = Format.FP8_E4M3
    granularity: Optional[Granularity] = None
    group_size: Optional[int] = None
    tile: tuple = (128, 128)
    block_size: int = 128
    axis: int = 0
    scale_encoding: Optional[ScaleEncoding] = None
    out_dtype: str = "bfloat16"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        fmt = _enum(Format, self.format, "format")
        set_("format", fmt)
        block, default_enc = _BLOCK_FORMATS.get(fmt, (128, ScaleEncoding.FP32))
        gran = Granularity.GROUP if self.granularity is None else _enum(Granularity, self.granularity, "granularity")
        set_("granularity", gran)
        enc = default_enc if self.scale_encoding is None else _enum(ScaleEncoding, self.scale_encoding, "scale_encoding")
        set_("scale_encoding", enc)
        if self.group_size is None:
            set_("group_size", block)
        set_("tile", tuple(int(t) for t in self.tile))
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"QuantSpec.out_dtype: unknown dtype {self.out_dtype!r} (expected one of {', '.join(OUT_DTYPES)})")
        for name in ("group_size", "block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QuantSpec.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.tile) != 2 or min(self.tile) < 1:
            raise ValueError(f"QuantSpec.tile must be two sizes >= 1, got {self.tile}")
        if fmt in _BLOCK_FORMATS:
            if gran != Granularity.GROUP or self.group_size != block:
                raise ValueError(f"QuantSpec.granularity: {fmt.value} is defined on 1x{block} groups only "
                                 f"(got {gran.value} {self.block_shape})")
            if enc != default_enc:
                raise ValueError(f"QuantSpec.scale_encoding: {fmt.value} scales are {default_enc.value}, got {enc.value}")
        elif enc == ScaleEncoding.E4M3:
            raise ValueError(f"QuantSpec.scale_encoding: e4m3 scales are nvfp4's, not {fmt.value}'s")
        if fmt == Format.INT8_ASYM and enc != ScaleEncoding.FP32:
            raise ValueError("QuantSpec.scale_encoding: int8_asym needs fp32 scales (the zero point absorbs the offset)")

    @property
    def element(self) -> ElementFormat:
        return ELEMENTS[self.format]

    @property
    def is_mx(self) -> bool:
        return self.format in MX_FORMATS

    @property
    def block_shape(self) -> tuple:
        """The granularity's size parameters, for messages and for the proto."""
        return {
            Granularity.TENSOR: (),
            Granularity.CHANNEL: (self.axis,),
            Granularity.GROUP: (self.group_size,),
            Granularity.TILE: self.tile,
            Granularity.FLAT: (self.block_size,),
        }[self.granularity]

    @property
    def code_dtype(self) -> torch.dtype:
        return self.element.code_dtype

    @property
    def scale_dtype(self) -> torch.dtype:
        return {ScaleEncoding.POW2: torch.float8_e8m0fnu, ScaleEncoding.E4M3: torch.float8_e4m3fn}.get(
            self.scale_encoding, torch.float32)

    @property
    def dequant_dtype(self) -> torch.dtype:
        return OUT_DTYPES[self.out_dtype]

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.block_shape)
        return f"{self.format.value}/{self.granularity.value}{('(' + size + ')') if size else ''}/{self.scale_encoding.value}"

    # ---- shapes -------------------------------------------------------------
    def check_shape(self, shape) -> None:
        """Raise ValueError if a tensor of `shape` cannot be quantized with this spec."""
        shape = tuple(shape)
        g = self.granularity
        if g == Granularity.CHANNEL:
            if not shape:
                raise ValueError("QuantSpec.axis: channel granularity needs a tensor with at least one dim")
            if not -len(shape) <= self.axis < len(shape):
                raise ValueError(f"QuantSpec.axis: axis {self.axis} out of range for shape {list(shape)}")
        if g in (Granularity.GROUP, Granularity.TILE) and not shape:
            raise ValueError(f"QuantSpec.granularity: {g.value} needs a tensor with at least one dim (got a 0-d tensor)")

    def code_shape(self, shape) -> tuple:
        shape = tuple(shape)
        if self.element.bits == 4:  # two codes a byte, low nibble first, along the last dim
            return shape[:-1] + ((shape[-1] + 1) // 2,) if shape else (1,)
        return shape

    def scale_shape(self, shape) -> tuple:
        """Shape of the scale tensor (row-major logical layout) for an input of `shape`."""
        self.check_shape(shape)
        shape = tuple(shape)
        g = self.granularity
        if g == Granularity.TENSOR:
            return ()
        if g == Granularity.CHANNEL:
            return (shape[self.axis],)
        if g == Granularity.GROUP:
            return shape[:-1] + (_cdiv(shape[-1], self.group_size),)
        if g == Granularity.TILE:
            rows = math.prod(shape[:-1])
            return (_cdiv(rows, self.tile[0]), _cdiv(shape[-1], self.tile[1]))
        return (_cdiv(math.prod(shape), self.block_size),)

    def storage(self, shape) -> Storage:
        """What a tensor of `shape` quantized with this spec is stored in (raises as scale_shape does)."""
        return _storage(self, tuple(shape))


@functools.lru_cache(maxsize=4096)
def _storage(spec: QuantSpec, shape: tuple) -> Storage:
    """QuantSpec.storage, kept for the shapes seen last: a small call asks for it each time (~5 us)."""
    scales = spec.scale_shape(shape)
    zero_points = (scales, torch.int8) if spec.format == Format.INT8_ASYM else None
    tensor_scale = ((), torch.float32) if spec.format == Format.NVFP4 else None
    return Storage((spec.code_shape(shape), spec.code_dtype), (scales, spec.scale_dtype), zero_points, tensor_scale)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class QuantizedTensor:
    """Codes, scales and what is needed to read them back.

    codes        torch.float8_e4m3fn / float8_e5m2 (raw OCP bits: `.view(torch.uint8)`),
                 int8, or uint8 holding two E2M1 codes a byte (low nibble first)
    scales       float32, torch.float8_e8m0fnu for pow2 scales or torch.float8_e4m3fn (nvfp4);
                 shape spec.scale_shape(shape)
    zero_points  int8 beside the scales for int8_asym, else None
    tensor_scale nvfp4: 0-d float32, the global scale: a block's divisor is its E4M3 scale / tensor_scale;
                 else None
    shape        the original tensor's shape
    """

    codes: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    shape: tuple
    zero_points: Optional[torch.Tensor] = None
    tensor_scale: Optional[torch.Tensor] = None

    def stored(self) -> dict:
        """{name: tensor} of the stored tensors, in Storage order (the order they travel in)."""
        return {name: getattr(self, name) for name in Storage._fields if getattr(self, name) is not None}

    @classmethod
    def from_stored(cls, tensors: dict, spec: QuantSpec, shape) -> "QuantizedTensor":
        """Inverse of stored(): a QuantizedTensor of {name: tensor} (names of Storage's fields)."""
        return cls(spec=spec, shape=tuple(shape), **{name: tensors.get(name) for name in Storage._fields})

    def dequantize(self, out_dtype=None):
        from . import dispatch  # here, not at the top: the dispatcher loads the backends, which import spec
        return dispatch.dequantize(self, out_dtype=out_dtype)
