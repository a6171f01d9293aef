"""The seed APIs, on quantd's own quantization paths.

Conventions that differ from quantd's (NUMERICS.md, "Seed APIs"):

* quantize_fp8 / dequantize_fp8 / FP8Format / fp8_gemm keep the seed's scale: a
  multiplier, code = x * scale with scale = 448 / amax. quantd's scales are divisors
  (code = x / scale, scale = amax / 448); these functions hand quantd 1 / multiplier
  (an fp32 division) and never expose the divisor. Codes are raw E4M3 bits in uint8
  (viewable as torch.float8_e4m3fn), not the seed's offset encoding.
* fp8_block_quantize returns the quantize-dequantize values with real E4M3 rounding
  (the seed's listing clamps but skips the cast to FP8, so its output equals the input);
  round_to_fp8=False reproduces the listing's numbers exactly.
* deepml_block_quantize reports x / scale rounded to integers, as the seed's examples do.
"""
from __future__ import annotations

import math

import torch

from . import dispatch, reference
from .spec import E4M3, Format, Granularity, QuantizedTensor, QuantSpec

_FP8_TENSOR = QuantSpec(Format.FP8_E4M3, Granularity.TENSOR)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NumericalOverflowError(ArithmeticError):
    """A tensor does not fit the FP8 range at any scale tried."""


# ---- 000: block-wise FP8 quantization, as a list of dicts ------------------------------


def deepml_block_quantize(tensor, block_size: int) -> list[dict]:
    """Blocks of `block_size` over the flattened tensor -> [{"block", "scale", "quantized"}].

    scale = amax / 448 (quantd's fp32 rule), rounded to 6 decimals; quantized = x / scale
    clamped to +-448 and rounded to integers, written as ints except +-448, written as
    floats (+-448.0) as in the seed's examples.
    """
    x = torch.as_tensor(tensor, dtype=torch.float32)
    spec = QuantSpec(Format.FP8_E4M3, Granularity.FLAT, block_size=_positive_int(block_size, "block_size"))
    blocks = reference.to_blocks(x, spec)
    scale, _, _ = reference.compute_scales(blocks, spec)
    q = torch.round(reference.encode_blocks(blocks, scale, None, E4M3, native_cast=True))
    out, numel = [], x.numel()
    for i in range(blocks.shape[0]):
        n = min(block_size, numel - i * block_size)
        values = [float(v) if abs(v) == E4M3.max else int(v) for v in q[i, :n].tolist()]
        out.append({"block": i, "scale": round(float(scale[i]), 6), "quantized": values})
    return out


# ---- 001: quantize-dequantize over flat blocks ----------------------------------------


def fp8_block_quantize(weights, block_size: int = 32, fp8_max: float = 448.0, *, round_to_fp8: bool = True) -> dict:
    """2-D weights -> {"quantized_weights": quantize-dequantize values, "scales": amax / fp8_max}.

    Blocks of `block_size` run over the row-major flattened weights (crossing rows).
    Scales are rounded to 8 digits and values to 6, as the seed does; fp8_max < 448
    narrows the range the block maps onto (fp8_max > 448 would not fit E4M3).
    round_to_fp8=True rounds each scaled value to E4M3 (quantd's FP8 path); False gives the
    seed listing's numbers exactly: float64 multiplier fp8_max / amax, clamp, divide back
    (no FP8 rounding, so the values come back unchanged but for the clamp and the rounding to 6 digits).
    """
    x = torch.as_tensor(weights, dtype=torch.float32 if round_to_fp8 else torch.float64)
    if x.dim() != 2:
        raise ValueError(f"fp8_block_quantize: weights must be 2-D (rows x cols), got shape {list(x.shape)}")
    if not 0 < fp8_max <= E4M3.max:
        raise ValueError(f"fp8_block_quantize: fp8_max must be in (0, {E4M3.max}], got {fp8_max}")
    spec = QuantSpec(Format.FP8_E4M3, Granularity.FLAT, block_size=_positive_int(block_size, "block_size"),
                     out_dtype="float32")
    blocks = reference.to_blocks(x, spec, dtype=x.dtype)
    amax = reference.block_amax(blocks)
    if round_to_fp8:
        scales = torch.where(amax > 0, amax / fp8_max, 1.0).reshape(-1)
        deq = dispatch.quantize(x, spec, scales=scales).dequantize(torch.float32)
    else:  # the listing's arithmetic, in Python floats (float64)
        multiplier = torch.where(amax < 1e-12, 1.0, fp8_max / amax)
        scales = (1.0 / multiplier).reshape(-1)
        deq = reference.from_blocks(torch.clamp(blocks * multiplier, -fp8_max, fp8_max) / multiplier, spec, x.shape)
    return {"quantized_weights": [[round(v, 6) for v in row] for row in deq.tolist()],
            "scales": [round(s, 8) for s in scales.tolist()]}


# ---- 003: per-tensor FP8 with the seed's multiplier scale -----------------------------


class FP8Format:
    """E4M3 constants and the seed's multiplier scales (scale = max_value / amax, 1.0 for all-zero)."""

    max_value = E4M3.max
    min_normal = E4M3.min_normal
    # |x * scale| above this rounds past max_value (halfway to the next binade step)
    overflow_threshold = E4M3.max + 2.0 ** (E4M3.emax - E4M3.mbits - 1)

    @classmethod
    def compute_scale(cls, tensor: torch.Tensor) -> torch.Tensor:
        """0-d float32 multiplier for the whole tensor (amax over finite values)."""
        return cls._scale_of(reference.block_amax(tensor.detach().float().reshape(1, -1)).reshape(()))

    @classmethod
    def compute_scale_per_channel(cls, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """float32 multipliers, one per index of `dim` (shape (tensor.shape[dim],))."""
        if tensor.dim() == 0 or not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"compute_scale_per_channel: dim {dim} out of range for shape {list(tensor.shape)}")
        blocks = tensor.detach().float().movedim(dim, 0).reshape(tensor.shape[dim], -1)
        return cls._scale_of(reference.block_amax(blocks).reshape(-1))

    @classmethod
    def is_in_range(cls, tensor: torch.Tensor, scale) -> bool:
        """Whether every non-NaN x * scale is finite and rounds to at most max_value."""
        q = tensor.detach().float() * torch.as_tensor(scale, dtype=torch.float32)
        return bool(((q.abs() <= cls.overflow_threshold) | torch.isnan(q)).all())

    @classmethod
    def _scale_of(cls, amax: torch.Tensor) -> torch.Tensor:
        return torch.where(amax > 0, cls.max_value / amax, 1.0).to(torch.float32)


def quantize_fp8(tensor: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (uint8 raw E4M3 codes of tensor * scale, the float32 multiplier scale).

    Without `scale` it is FP8Format.compute_scale(tensor). Codes come from quantd's
    per-tensor path with the divisor 1 / scale (on the tensor's device's backend).
    """
    _check_input(tensor, "quantize_fp8")
    scale = FP8Format.compute_scale(tensor) if scale is None else _check_scale(scale, tensor, "quantize_fp8")
    qt = dispatch.quantize(tensor, _FP8_TENSOR, scales=_divisor(scale))
    return qt.codes.view(torch.uint8), scale


def dequantize_fp8(tensor: torch.Tensor, scale: torch.Tensor, output_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """uint8 E4M3 codes and their multiplier scale -> codes / scale as output_dtype."""
    if tensor.dtype != torch.uint8:
        raise TypeError(f"dequantize_fp8: codes must be torch.uint8 (raw E4M3 bits), got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError("dequantize_fp8: codes must be contiguous")
    if output_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_fp8: output_dtype must be float16, bfloat16 or float32, got {output_dtype}")
    scale = _check_scale(scale, tensor, "dequantize_fp8")
    return _as_quantized(tensor, scale).dequantize(output_dtype)


def quantize_fp8_with_overflow_handling(tensor: torch.Tensor, scale: torch.Tensor | None = None,
                                        max_attempts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8, halving `scale` until tensor * scale fits E4M3 (FP8Format.is_in_range).

    Raises NumericalOverflowError after max_attempts tries that do not fit; +-Inf never fits.
    """
    _check_input(tensor, "quantize_fp8_with_overflow_handling")
    if int(max_attempts) < 1:
        raise ValueError(f"quantize_fp8_with_overflow_handling: max_attempts must be >= 1, got {max_attempts}")
    scale = FP8Format.compute_scale(tensor) if scale is None else _check_scale(
        scale, tensor, "quantize_fp8_with_overflow_handling")
    for _ in range(int(max_attempts)):
        if FP8Format.is_in_range(tensor, scale):
            return quantize_fp8(tensor, scale)
        scale = scale / 2
    raise NumericalOverflowError(
        f"tensor does not fit the FP8 E4M3 range (max {FP8Format.max_value}) after {max_attempts} attempts "
        f"(last scale {float(scale * 2)}, amax {float(tensor.detach().float().abs().max())})")


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None = None,
             b_scale: torch.Tensor | None = None, output_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """a (M, K) @ b (K, N) through per-tensor E4M3 operands, fp32 accumulation.

    Float operands are quantized here (with a_scale / b_scale if given, else automatic
    scales); uint8 operands are quantize_fp8 codes and need their multiplier scale.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_gemm: expected a (M, K) and b (K, N), got {list(a.shape)} and {list(b.shape)}")
    if output_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fp8_gemm: output_dtype must be float16, bfloat16 or float32, got {output_dtype}")
    qa = _gemm_operand(a, a_scale, "a")
    qb = _gemm_operand(b, b_scale, "b")
    # quantd's GEMM is A @ B^T with B (N, K); a per-tensor operand transposes freely.
    qb_t = QuantizedTensor(qb.codes.T.contiguous(), qb.scales, qb.spec, (b.shape[1], b.shape[0]))
    return dispatch.matmul(qa, qb_t, output_dtype)


# ---- helpers ----------------------------------------------------------------------------


def _gemm_operand(t: torch.Tensor, scale, name: str) -> QuantizedTensor:
    if t.dtype == torch.uint8:
        if scale is None:
            raise ValueError(f"fp8_gemm: {name} is uint8 FP8 codes; pass {name}_scale (its quantize_fp8 scale)")
        if not t.is_contiguous():
            raise ValueError(f"fp8_gemm: {name} must be contiguous")
        return _as_quantized(t, _check_scale(scale, t, "fp8_gemm"))
    codes, scale = quantize_fp8(t, scale)
    return _as_quantized(codes, scale)


def _as_quantized(codes: torch.Tensor, scale: torch.Tensor) -> QuantizedTensor:
    return QuantizedTensor(codes.view(torch.float8_e4m3fn), _divisor(scale), _FP8_TENSOR, tuple(codes.shape))


def _divisor(multiplier: torch.Tensor) -> torch.Tensor:
    """quantd's scale (a divisor) for the seed's multiplier."""
    return (1.0 / multiplier.float()).reshape(())


def _check_input(tensor, fn: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype {tensor.dtype} is not supported (expected float16, bfloat16 or float32)")
    if not tensor.is_contiguous():
        raise ValueError(f"{fn}: tensor must be contiguous")


def _check_scale(scale, tensor: torch.Tensor, fn: str) -> torch.Tensor:
    """The seed's rule: a positive float32 scalar tensor on the tensor's device."""
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        got = f"{scale.dtype} of shape {list(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"{fn}: scale must be a float32 scalar tensor, got {got}")
    if scale.device != tensor.device:
        raise ValueError(f"{fn}: scale is on {scale.device} but the tensor is on {tensor.device}")
    value = float(scale)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{fn}: scale must be positive and finite, got {value}")
    return scale.reshape(())


def _positive_int(value, name: str) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
