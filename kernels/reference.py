"""The CPU reference: the specification every backend must match bit for bit.

Written in plain torch for clarity, not speed (the CPU backend compiles these same
functions). Semantics, also in NUMERICS.md:

* A block's amax is the largest finite |x|; NaN and +-Inf do not take part.
* fp32 scale = amax / qmax (IEEE division); a scale that would be 0 (an all-zero block,
  or amax so small that the division underflows) is 1.0.
* pow2 scale (FP8/INT8) = 2**ceil(log2(amax / qmax)), so nothing overflows (amax / qmax
  below 2**-126 counts as 2**-126); all-zero blocks get 2**0.
* MX scale (OCP MX v1.0) = 2**(floor(log2(amax)) - emax_elem); elements may saturate.
  pow2/MX exponents are clamped to [-127, 127] and stored as E8M0 bits.
* Ragged blocks are zero-padded; an empty tensor quantizes like an all-zero one.
* Codes: q = x / scale (IEEE division), clamped to +-qmax, then rounded to nearest,
  ties to even, onto the element grid (subnormals kept). +-Inf saturates to +-qmax.
  NaN encodes as the format's NaN (E4M3/E5M2: 0x7F, either sign); formats without NaN encode
  it as the code of 0.0 (int8: 0, int8_asym: the zero point, E2M1: 0). NaNs are
  counted by `report`.
* nvfp4 (compressed-tensors' NVFP4): tensor_scale = 2688 / max(tensor amax, 2**-126) (1.0 if not finite);
  block scale s8 = E4M3(min(tensor_scale x (amax / 6), 448)) (0.125 where that is 0); the block's divisor is
  s8 / tensor_scale, in fp32; codes as for any E2M1 format.
* int8_asym: lo = min(min x, 0), hi = max(max x, 0) over finite x, scale = (hi - lo) / 255,
  zero_point = -128 - round(lo / scale), code = clamp(round(x / scale) + zp, -128, 127).
* Dequantized value = code x scale (int8_asym: (code - zp) x scale), in fp32, cast once;
  NaN payloads are unspecified.
* matmul: C = A @ B^T (A (M, K), B (N, K)); see its docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import (E2M1, E4M3, E8M0_BIAS, NVFP4_ZERO_SCALE, ElementFormat, Format, Granularity, QuantizedTensor,
                   QuantSpec, ScaleEncoding, INPUT_DTYPES, _cdiv)

# ---- element grids ------------------------------------------------------------------


def _exponent(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for positive normal fp32 a, read off the bits (-127 for subnormals and 0)."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as fp32 for integer e in [-126, 127]."""
    return ((e + 127) << 23).view(torch.float32)


def round_to_grid(v: torch.Tensor, el: ElementFormat) -> torch.Tensor:
    """Round fp32 `v` (finite, |v| <= el.max) to the nearest value of a minifloat grid, ties to even."""
    a = v.abs()
    quantum = _pow2(torch.clamp(_exponent(a), min=el.emin) - el.mbits)
    return torch.copysign(torch.round(a / quantum) * quantum, v)


def encode_minifloat_bits(g: torch.Tensor, el: ElementFormat) -> torch.Tensor:
    """Raw bits (int32) of grid values `g` (exactly representable in `el`)."""
    a = g.abs()
    normal = a >= el.min_normal
    e = _exponent(a)
    mant_normal = (a.view(torch.int32) >> (23 - el.mbits)) & ((1 << el.mbits) - 1)
    normal_bits = ((e + el.bias) << el.mbits) | mant_normal
    sub_bits = (a / el.min_subnormal).to(torch.int32)
    bits = torch.where(normal, normal_bits, sub_bits)
    return bits | (torch.signbit(g).to(torch.int32) << (el.bits - 1))


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of fp32 `v` (|v| <= 6, or NaN): the magnitude code of the nearest grid value, ties
    to even; the sign bit is v's (-0, and negative values rounding to 0, keep it); NaN -> 0. The grid's step is 0.5
    below 2 (codes 0..4), 1 in [2, 4) (codes 4..6) and 2 in [4, 6] (codes 6, 7): the code is |v| in steps rounded
    half to even (torch.round), plus 0, 2 or 4 (even: a tie keeps its parity). A grid value gives its own code, so
    this encodes round_to_grid's values, and the clamped quotients themselves in one step (encode_blocks'
    native_cast)."""
    a = v.abs()
    magnitude = torch.where(a < 2, torch.round(a * 2), torch.where(a < 4, torch.round(a) + 2, torch.round(a * 0.5) + 4))
    code = magnitude + torch.where(v.view(torch.int32) < 0, 8.0, 0.0)
    return torch.where(v != v, 0.0, code).to(torch.uint8)


def decode_e2m1(nibbles: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (int tensor of 4-bit values)."""
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                         device=nibbles.device)
    return table[nibbles.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) int codes (0..15) -> (..., ceil(K/2)) uint8, element 2i in the low nibble: each pair of code bytes
    read as one little-endian 16-bit word (contiguous: no strided pair access, which a compiled graph would loop
    over element by element)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    if codes.shape[-1] == 0:  # (a view of int16 words needs an even row stride)
        return codes
    words = codes.contiguous().view(torch.int16).to(torch.int32)  # (..., K / 2): low byte element 2i
    return ((words & 0x0F) | ((words >> 4) & 0xF0)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_nibbles: (..., ceil(K/2)) uint8 -> (..., K) int32 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :k].to(torch.int32)


# ---- blocks --------------------------------------------------------------------------


def to_blocks(x: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """View `x` as (num_blocks, block_elems) of `dtype` (fp32 unless told), zero-padding ragged blocks.

    Blocks come out in the row-major order of spec.scale_shape(x.shape).
    """
    g = spec.granularity
    x = x.to(dtype)
    # Tensor and channel blocks of an empty tensor get one padding zero, so that every
    # block has an amax (an empty block quantizes like an all-zero one).
    if g == Granularity.TENSOR:
        return _pad(x.reshape(1, -1), (0, int(x.numel() == 0)))
    if g == Granularity.CHANNEL:
        rest = math.prod(x.shape) // max(x.shape[spec.axis], 1)
        return _pad(x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], rest), (0, int(rest == 0)))
    if g == Granularity.FLAT:
        n = spec.block_size
        flat = x.reshape(-1)
        return _pad(flat, (0, (-flat.numel()) % n)).reshape(-1, n)
    rows, k = math.prod(x.shape[:-1]), x.shape[-1]
    x2 = x.reshape(rows, k)
    if g == Granularity.GROUP:
        gs = spec.group_size
        return _pad(x2, (0, (-k) % gs)).reshape(-1, gs)
    tr, bm, tc, bn = (x4 := tile_grid(x2, spec.tile)).shape
    return x4.permute(0, 2, 1, 3).reshape(tr * tc, bm * bn)


def tile_grid(x2: torch.Tensor, tile: tuple) -> torch.Tensor:
    """A 2-D tensor zero-padded to whole bm x bn tiles, as (tile rows, bm, tile columns, bn)."""
    (rows, k), (bm, bn) = x2.shape, tile
    x2 = _pad(x2, (0, (-k) % bn, 0, (-rows) % bm))
    return x2.reshape(x2.shape[0] // bm, bm, x2.shape[1] // bn, bn)


def _pad(x: torch.Tensor, pad: tuple) -> torch.Tensor:
    """F.pad with zeros, but a view (no copy) when nothing needs padding."""
    return F.pad(x, pad) if any(pad) else x


def from_blocks(blocks: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """Inverse of to_blocks: (num_blocks, block_elems) -> `shape`, dropping the padding."""
    shape = tuple(shape)
    g = spec.granularity
    numel = math.prod(shape)
    if g in (Granularity.TENSOR, Granularity.FLAT):
        return blocks.reshape(-1)[:numel].reshape(shape)
    if g == Granularity.CHANNEL:
        moved = (shape[spec.axis],) + shape[:spec.axis % len(shape)] + shape[spec.axis % len(shape) + 1:]
        return blocks[:, :math.prod(moved[1:])].reshape(moved).movedim(0, spec.axis)
    rows, k = math.prod(shape[:-1]), shape[-1]
    if g == Granularity.GROUP:
        return blocks.reshape(rows, _cdiv(k, spec.group_size) * spec.group_size)[:, :k].reshape(shape)
    bm, bn = spec.tile
    tr, tc = _cdiv(rows, bm), _cdiv(k, bn)
    x2 = blocks.reshape(tr, tc, bm, bn).permute(0, 2, 1, 3).reshape(tr * bm, tc * bn)
    return x2[:rows, :k].reshape(shape)


# ---- scales --------------------------------------------------------------------------


def block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """Largest finite |x| of each block, (B, 1)."""
    a = blocks.abs()
    # a < inf is isfinite for a = |x| (false for NaN and Inf), written as a comparison,
    # which the compiled CPU backend vectorizes.
    return torch.where(a < math.inf, a, 0.0).amax(dim=1, keepdim=True)


def amax(x: torch.Tensor) -> torch.Tensor:
    """Largest finite |x| of the whole tensor, a 0-d fp32 on x's device (0 when there is none): what a per-tensor
    scale is computed from, and what delayed scaling keeps from step to step (tensor_scale turns it into a scale)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return block_amax(x.detach().float().reshape(1, -1)).reshape(())


def tensor_scale(amax: torch.Tensor | float, spec: QuantSpec) -> torch.Tensor:
    """The scale a per-tensor quantize with `spec` computes for a tensor of largest finite magnitude `amax`, as a
    0-d fp32 tensor: passed as quantize(x, spec, scales=...), it gives x the codes of quantize(x, spec) whenever
    amax is reference.amax(x)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if spec.format == Format.NVFP4:  # its tensor scale, the multiplier of that amax
        return nvfp4_tensor_scale(amax).reshape(())
    return compute_scales(amax.reshape(1, 1), spec)[0].reshape(())


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's tensor scale (a multiplier) of a tensor of finite amax `amax`: 448 * 6 / max(amax, 2**-126), 1.0 where
    that is not finite (compressed-tensors' generate_gparam)."""
    tensor_scale = (E4M3.max * E2M1.max) / torch.clamp(amax, min=2.0 ** -126)
    return torch.where(tensor_scale < math.inf, tensor_scale, 1.0)


def pow2_exponent(s: torch.Tensor, ceil: bool) -> torch.Tensor:
    """floor or ceil of log2 of positive fp32 `s`, clamped to E8M0's [-127, 127].

    Read off the bits: ceil takes a subnormal `s` (< 2**-126) as 2**-126, so it gives -126
    where the exact ceil would be -127 (s <= 2**-127); the scale is then one binade
    coarser than needed, and still never lets a code overflow.
    """
    e = _exponent(s)
    if ceil:
        e = e + ((s.view(torch.int32) & 0x7FFFFF) != 0).to(torch.int32)
    return torch.clamp(e, -127, 127)


def compute_scales(blocks: torch.Tensor, spec: QuantSpec):
    """Per-block (scale fp32 (B, 1), E8M0 exponent or None, zero point or None)."""
    el = spec.element
    if spec.format == Format.INT8_ASYM:
        finite = blocks.abs() < math.inf  # isfinite, as a comparison (vectorized when compiled)
        lo = torch.where(finite, blocks, 0.0).amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = torch.where(finite, blocks, 0.0).amax(dim=1, keepdim=True).clamp(min=0.0)
        span = hi - lo
        scale = span / 255.0
        scale = torch.where(scale > 0, scale, 1.0)
        zp = -128 - torch.round(lo / scale)
        return scale, None, zp
    amax = block_amax(blocks)
    if spec.scale_encoding == ScaleEncoding.FP32:
        scale = amax / el.max
        return torch.where(scale > 0, scale, 1.0), None, None
    if spec.is_mx:
        # OCP MX: floor(log2(amax)) - emax, clamped; an all-zero block (amax exponent -127) gets -127, E8M0 0,
        # as the OCP reference library (microxcaling) and torchao write it.
        e = torch.clamp(_exponent(amax) - el.emax, -127, 127)
    else:
        e = torch.where(amax > 0, pow2_exponent(amax / el.max, ceil=True), 0)
    return torch.ldexp(torch.ones_like(amax), e.float()), e, None


def nvfp4_scales(blocks: torch.Tensor, tensor_scale: torch.Tensor | None = None):
    """NVFP4's (divisor fp32 (B, 1), E4M3 block scales fp32 (B, 1), tensor scale fp32 0-d) of (B, 16) blocks.

    compressed-tensors' arithmetic (generate_gparam, calculate_qparams, _quantize) on fp32 statistics:
    tensor_scale = 448 * 6 / amax over the whole tensor (amax at least 2**-126; 1.0 if the quotient is not
    finite), or the one given (a multiplier: one shared by the parts of a fused module, or delayed scaling's),
    each block's scale the E4M3 rounding (RNE, clamped to 448) of tensor_scale x (block amax / 6),
    0.125 where that is 0, and the block divides by scale / tensor_scale.
    """
    amax = block_amax(blocks)
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(F.pad(amax.reshape(-1), (0, 1)).amax())  # a padding 0: an empty tensor's is 0
    else:
        tensor_scale = tensor_scale.float().reshape(())
    s8 = round_to_grid(torch.clamp(tensor_scale * (amax / E2M1.max), max=E4M3.max), E4M3)
    s8 = torch.where(s8 > 0, s8, NVFP4_ZERO_SCALE)
    return s8 / tensor_scale, s8, tensor_scale


# ---- quantize -----------------------------------------------------------------------


def encode_blocks(blocks: torch.Tensor, scale: torch.Tensor, zp, el: ElementFormat, native_cast: bool = False):
    """Codes of `blocks` given per-block scales: fp32 grid values, or int values for int8.

    native_cast: for formats with a torch float8 dtype and for E2M1, return the clamped quotients and
    leave the rounding to store_codes (torch's RNE cast; e2m1_codes), both proven equal to
    round_to_grid on every input by the tests; used by the CPU backend for speed.
    """
    nan = blocks != blocks  # isnan, as a comparison (vectorized when compiled)
    q = torch.clamp(blocks / scale, -el.max if zp is None else -math.inf, el.max if zp is None else math.inf)
    if native_cast and (el.code_dtype.is_floating_point or el is E2M1):
        return q
    if el.kind == "int":
        if zp is None:
            codes = torch.round(torch.clamp(q, -el.max, el.max))
        else:
            lo, hi = torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max
            codes = torch.clamp(torch.round(torch.clamp(q, -2 * (el.max + 1), 2 * (el.max + 1))) + zp, lo, hi)
        return torch.where(nan, 0.0 if zp is None else zp, codes)
    return torch.where(nan, q, round_to_grid(torch.where(nan, 0.0, q), el))


def store_codes(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Grid values (fp32) -> the storage dtype of the spec's codes (E2M1: packed along the last dim)."""
    el = spec.element
    if el.kind == "int":
        return values.to(torch.int8)
    if el is E2M1:  # grid values or (native_cast) clamped quotients; NaN's code is 0
        return pack_nibbles(e2m1_codes(values))
    # Grid values (or, with native_cast, clamped quotients) only reach this cast. Every NaN
    # becomes +NaN first (v != v is isnan, vectorized when compiled), which torch's cast
    # writes as el.nan_code (0x7F); a NaN's sign would otherwise survive as 0xFF.
    return torch.where(values != values, math.nan, values).to(el.code_dtype)


def check_input(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None) -> None:
    """Raise TypeError/ValueError for an input (and explicit scales) that quantize cannot take."""
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"quantize: input dtype {x.dtype} is not supported (expected bfloat16, float16 or float32)")
    spec.check_shape(x.shape)
    if scales is None:
        return
    if scales.device != x.device:
        raise ValueError(f"quantize: scales are on {scales.device}, the input on {x.device}")
    check_scales(scales, spec, x.shape)


def given_scale_shape(spec: QuantSpec, shape) -> tuple:
    """Shape of the explicit scales quantize takes for a tensor of `shape`: spec.scale_shape, except nvfp4's,
    which is its tensor scale alone (one fp32 multiplier; its E4M3 block scales are always derived)."""
    return () if spec.format == Format.NVFP4 else spec.scale_shape(shape)


def check_scales(scales: torch.Tensor, spec: QuantSpec, shape) -> None:
    """Raise ValueError for explicit scales that a tensor of `shape` cannot be quantized with."""
    if spec.format == Format.INT8_ASYM:
        raise ValueError(f"quantize: {spec.format.value} derives its scales; explicit scales are not supported")
    want = given_scale_shape(spec, shape)
    if scales.numel() != math.prod(want):
        what = "its tensor scale alone, one value" if spec.format == Format.NVFP4 else f"shape {list(want)}"
        raise ValueError(f"quantize: scales must have {what}, got {list(scales.shape)}")
    s = scales.float()
    v = s.item() if s.numel() == 1 and s.device.type == "cpu" else None  # a host tensor scale: a Python float
    if not (0 < v < math.inf if v is not None else bool(((s > 0) & (s < math.inf)).all())):
        raise ValueError("quantize: explicit scales must be positive and finite")
    if spec.scale_encoding == ScaleEncoding.POW2:
        if v is not None:
            power = math.frexp(v)[0] == 0.5 and 2.0 ** -126 <= v <= 2.0 ** 127
        else:
            power = bool((((s.view(torch.int32) & 0x7FFFFF) == 0) & (s >= 2.0 ** -126) & (s <= 2.0 ** 127)).all())
        if not power:
            raise ValueError("quantize: pow2 scales must be powers of two in [2**-126, 2**127] (E8M0)")


def quantize(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize `x` with `spec`. If `scales` (fp32, shape spec.scale_shape) is given it is used as is."""
    check_input(x, spec, scales)
    codes, stored_scales, zero_points, tensor_scale = quantize_tensors(x, spec, scales)
    return QuantizedTensor(codes, as_e8m0(stored_scales), spec, tuple(x.shape), zero_points, tensor_scale)


def quantize_tensors(x: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None):
    """quantize() on tensors alone: (codes, stored scales, zero points or None, tensor scale or None)."""
    values, stored_scales, zero_points, tensor_scale = quantize_blocks(to_blocks(x, spec), spec, scales)
    sshape = spec.scale_shape(x.shape)
    zero_points = None if zero_points is None else zero_points.reshape(sshape)
    return (store_codes(from_blocks(values, spec, x.shape), spec), stored_scales.reshape(sshape), zero_points,
            tensor_scale)


def quantize_blocks(blocks: torch.Tensor, spec: QuantSpec, scales: torch.Tensor | None = None,
                    native_cast: bool = False, whole: bool = False):
    """The blockwise core of quantize on (B, E) fp32 blocks.

    Returns (code values (B, E) fp32 as encode_blocks gives them, stored scales (B,)
    fp32, uint8 E8M0 bits or float8_e4m3fn, int8 zero points (B,) or None, 0-d fp32 tensor scale or None).
    whole: the B rows are one block (a tensor's rows; the same values as its (1, B * E) view): one scale.
    """
    if spec.format == Format.NVFP4:
        scale, s8, tensor_scale = nvfp4_scales(blocks, scales)
        values = encode_blocks(blocks, scale, None, spec.element, native_cast).expand(blocks.shape)
        return values, s8.reshape(-1).to(torch.float8_e4m3fn), None, tensor_scale
    if scales is None:
        scale, e8m0, zp = compute_scales(blocks.reshape(1, -1) if whole else blocks, spec)
    else:
        scale, e8m0, zp = scales.float().reshape(-1, 1), None, None
    values = encode_blocks(blocks, scale, zp, spec.element, native_cast).expand(blocks.shape)
    if spec.scale_encoding == ScaleEncoding.POW2:
        e8m0 = pow2_exponent(scale, ceil=False) if e8m0 is None else e8m0
        stored_scales = (e8m0 + E8M0_BIAS).to(torch.uint8).reshape(-1)
    else:
        stored_scales = scale.reshape(-1)
    return values, stored_scales, None if zp is None else zp.to(torch.int8).reshape(-1), None


def as_e8m0(stored_scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bits -> torch.float8_e8m0fnu (a view; kept outside compiled graphs)."""
    return stored_scales.view(torch.float8_e8m0fnu) if stored_scales.dtype == torch.uint8 else stored_scales


# ---- dequantize ---------------------------------------------------------------------


def code_values(qt: QuantizedTensor) -> torch.Tensor:
    """fp32 values of the codes (before scaling), in the original shape."""
    el = qt.spec.element
    if el is E2M1:
        k = qt.shape[-1] if qt.shape else 1
        return decode_e2m1(unpack_nibbles(qt.codes, k)).reshape(qt.shape)
    return qt.codes.float()


def scale_values(qt: QuantizedTensor) -> torch.Tensor:
    """fp32 divisors, logical shape spec.scale_shape (nvfp4: E4M3 scale / tensor scale, IEEE fp32 division)."""
    if qt.tensor_scale is not None:
        return qt.scales.float() / qt.tensor_scale.float()
    return qt.scales.float()


def dequantize(qt: QuantizedTensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """code x scale (int8_asym: (code - zp) x scale) in fp32, cast once to out_dtype (default spec.out_dtype)."""
    spec = qt.spec
    zp = None if qt.zero_points is None else qt.zero_points.reshape(-1, 1)
    vals = dequantize_blocks(to_blocks(code_values(qt), spec), scale_values(qt).reshape(-1, 1), zp)
    return from_blocks(vals, spec, qt.shape).to(out_dtype or spec.dequant_dtype)


def dequantize_blocks(values: torch.Tensor, scale: torch.Tensor, zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """(B, E) fp32 code values, (B, 1) fp32 scales and int8 zero points (or None) -> (B, E) fp32."""
    if zero_points is not None:
        values = values - zero_points.float()
    return values * scale


# ---- report -------------------------------------------------------------------------


def report(x: torch.Tensor, qt: QuantizedTensor) -> dict:
    """What the server tells a client about a quantization: amax, SQNR, saturation, NaNs."""
    xf = x.float()
    finite = torch.isfinite(xf)
    deq = dequantize(qt, torch.float32)
    err = torch.where(finite, xf - deq, 0.0).double()
    sig = torch.where(finite, xf, 0.0).double()
    noise = float((err * err).sum())
    signal = float((sig * sig).sum())
    ratio = math.inf if noise == 0 else signal / noise  # 0 where a dequantized value overflowed (noise inf)
    return {
        "amax": float(block_amax(xf.reshape(1, -1))) if xf.numel() else 0.0,
        "sqnr_db": 10 * math.log10(ratio) if ratio > 0 else -math.inf,
        "saturated": saturated_count(x, qt),
        "nan_count": int(torch.isnan(xf).sum()),
    }


def saturated_count(x: torch.Tensor, qt: QuantizedTensor) -> int:
    """Elements whose value fell outside the code range and were clamped (+-Inf included)."""
    blocks = to_blocks(x, qt.spec)
    q = blocks / scale_values(qt).reshape(-1, 1)
    el = qt.spec.element
    if el.kind == "int":
        if qt.zero_points is not None:
            q = torch.round(torch.clamp(q, -512.0, 512.0)) + qt.zero_points.float().reshape(-1, 1)
            over = (q < -128) | (q > 127)
        else:
            over = torch.round(torch.clamp(q.abs(), max=512.0)) > 127
    else:
        over = q.abs() > el.max + 2.0 ** (el.emax - el.mbits - 1)
    return int((over & ~torch.isnan(blocks)).sum())


# ---- GEMMs --------------------------------------------------------------------------


def matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C = A @ B^T for A (M, K) and B (N, K), the nn.Linear convention.

    FP8/MX operands: the fp32 dequantized operands (code x scale, exact) multiplied and
    summed in fp64, rounded once to fp32, then cast to out_dtype. A block-scaled GEMM with
    fp32 accumulation rounds along the way, so backends agree with this to a tolerance.
    INT8: int32 accumulation of the codes with zero-point correction, then scaled in fp32.
    """
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"matmul: expected A (M, K) and B (N, K), got {list(a.shape)} and {list(b.shape)}")
    ea, eb = a.spec.element, b.spec.element
    if (ea.kind == "int") != (eb.kind == "int"):
        raise ValueError("matmul: cannot mix integer and floating-point operands")
    if ea.kind == "int":
        return _int8_matmul(a, b).to(out_dtype)
    return (dequantize(a, torch.float32).double() @ dequantize(b, torch.float32).double().T).float().to(out_dtype)


def _row_scales(qt: QuantizedTensor, rows: int):
    """Per-row scale and zero point of an int8 operand quantized per tensor or per row (channel axis 0)."""
    g = qt.spec.granularity
    if not (g == Granularity.TENSOR or (g == Granularity.CHANNEL and qt.spec.axis in (0, -2))):
        raise ValueError(f"matmul: int8 operands must be quantized per tensor or per row (channel, axis 0), got {g.value}")
    scale = qt.scales.float().reshape(-1).expand(rows)
    zp = (qt.zero_points.int().reshape(-1) if qt.zero_points is not None else torch.zeros(1, dtype=torch.int32, device=qt.codes.device)).expand(rows)
    return scale, zp


def _int8_matmul(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    qa, qb = a.codes.to(torch.int64), b.codes.to(torch.int64)
    k = qa.shape[1]
    sa, za = _row_scales(a, qa.shape[0])
    sb, zb = _row_scales(b, qb.shape[0])
    acc = qa @ qb.T
    acc = acc - za[:, None] * qb.sum(1)[None, :] - zb[None, :] * qa.sum(1)[:, None] + k * za[:, None] * zb[None, :]
    return acc.to(torch.int32).float() * (sa[:, None] * sb[None, :])
