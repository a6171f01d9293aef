"""A numpy model of the sm_90 PTX the kernels inline (tl.inline_asm_elementwise), so that the Triton interpreter runs
the kernels' PTX paths on a machine without a GPU.

install() replaces the interpreter's create_inline_asm, which raises, by run(): the asm text parsed into its
instructions, each carried out on every element at once. It models the instructions the kernels use and nothing
else (an unknown one raises): 32-bit integer arithmetic and logic, byte permutes (prmt), u16x2 min/max, and the
IEEE ones (.rn, no .ftz: subnormals kept) on f32, bf16x2 and the cvt into f16x2 / bf16x2, each rounded once from
the exact result (products and sums formed exactly in float64, or rounded to odd there when float64 cannot hold
them, which rounds correctly to any narrower format). NaN results are the canonical NaN of their type. Calls of
one element an instance (pack=1), and of four into bytes (pack=4: run_packed4).

It is a model of the PTX ISA's text, not of the GPU: the GPU tests (`-m gpu`) compare the compiled PTX with the
reference, this lets CI run the code around it (layouts, masks, the tiles' fast and careful branches).
"""
from __future__ import annotations

import functools
import re

import numpy as np

U32 = np.uint32
_MASK32 = 0xFFFFFFFF


def install() -> None:
    """Run inline PTX through this model in the Triton interpreter (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder
    if not getattr(InterpreterBuilder.create_inline_asm, "models_ptx", False):
        InterpreterBuilder.create_inline_asm = _create_inline_asm


def _create_inline_asm(self, inlineAsm, constraints, values, type, isPure, pack):
    from triton.runtime.interpreter import TensorHandle
    dtypes = [getattr(t, "element_ty", t) for t in type]
    if pack == 1:
        outs = run(inlineAsm, constraints, [v.data for v in values], len(dtypes))
    elif pack == 4 and all(dt.name in ("int8", "uint8") for dt in dtypes):
        outs = run_packed4(inlineAsm, constraints, [v.data for v in values], len(dtypes))
    else:
        raise NotImplementedError(f"ptx_model: pack={pack} into {[dt.name for dt in dtypes]}")
    return _Call([TensorHandle(o.view(_NP[dt.name]), dt) for o, dt in zip(outs, dtypes)])


_create_inline_asm.models_ptx = True
_NP = {"int32": np.int32, "uint32": np.uint32, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8}


def run_packed4(asm: str, constraints: str, args: list, n_out: int) -> list:
    """run() of a pack=4 call into 8-bit outputs, as Triton lowers it: each input's 32-bit elements four at a time
    (operands $n_out + 4k .. $n_out + 4k + 3 for input k), each output one register of four bytes (byte j: element
    j). Elements are grouped in the order of the broadcast inputs' flattening; the asm must treat each element
    alike, as it cannot know which four a GPU thread groups."""
    arrays = np.broadcast_arrays(*[np.ascontiguousarray(a) for a in args])
    shape, n = arrays[0].shape, arrays[0].size
    quads = [np.concatenate([a.ravel(), np.zeros(-n % 4, a.dtype)]).reshape(-1, 4) for a in arrays]
    regs = run(asm, constraints, [q[:, j].copy() for q in quads for j in range(4)], n_out)
    return [np.ascontiguousarray(r).view(np.uint8).reshape(-1)[:n].reshape(shape) for r in regs]


class _Call:
    def __init__(self, results):
        self.results = results

    def get_result(self, i):
        return self.results[i]


def run(asm: str, constraints: str, args: list, n_out: int) -> list:
    """The n_out outputs (uint32 arrays) of PTX `asm` on numpy arrays `args` (32-bit registers: int32, uint32 or
    float32, broadcast together), operands $0.. the outputs, then the inputs, as `constraints` lists them."""
    kinds = [c.strip().lstrip("=") for c in constraints.split(",")]
    if any(k not in ("r", "f") for k in kinds) or len(kinds) != n_out + len(args):
        raise NotImplementedError(f"ptx_model: constraints {constraints!r}")
    arrays = np.broadcast_arrays(*[np.ascontiguousarray(a) for a in args])
    regs = {f"${n_out + i}": _bits(a) for i, a in enumerate(arrays)}
    shape = arrays[0].shape if arrays else ()
    for op, operands in _parse(asm):
        dst, srcs = operands[0], [_value(regs, s) for s in operands[1:]]
        regs[dst] = np.broadcast_to(_OPS[op](*srcs), shape).astype(U32)
    return [regs[f"${i}"] for i in range(n_out)]


def _bits(a: np.ndarray) -> np.ndarray:
    if a.dtype.itemsize != 4:
        raise NotImplementedError(f"ptx_model: a {a.dtype} operand (32-bit registers only)")
    return a.view(U32)


@functools.lru_cache(maxsize=None)
def _parse(asm: str) -> tuple:
    body = re.sub(r"//[^\n]*", "", asm).replace("{", ";").replace("}", ";")
    program = []
    for statement in body.split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, _, rest = statement.partition(" ")
        if op not in _OPS:
            raise NotImplementedError(f"ptx_model: {op}")
        program.append((op, tuple(s.strip() for s in rest.split(","))))
    return tuple(program)


def _value(regs: dict, operand: str) -> np.ndarray:
    if operand in regs:
        return regs[operand]
    if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", operand):
        return U32(int(operand[2:], 16))
    if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", operand):
        return U32(int(operand, 0) & _MASK32)
    raise NotImplementedError(f"ptx_model: operand {operand!r} (an unset register?)")


# Integers: uint32 bits, wrapping.
def _u64(a):
    return np.asarray(a).astype(np.uint64)


def _low32(v):
    return (v & np.uint64(_MASK32)).astype(U32)


def _halves(a):
    a = np.asarray(a, dtype=U32)
    return a & U32(0xFFFF), a >> U32(16)


def _join(lo, hi):
    return (np.asarray(lo, dtype=U32) & U32(0xFFFF)) | (np.asarray(hi, dtype=U32) << U32(16))


def _u16x2(f):
    def op(a, b):
        (al, ah), (bl, bh) = _halves(a), _halves(b)
        return _join(f(al, bl), f(ah, bh))
    return op


# Floats: (stored mantissa bits, exponent of the smallest normal); subnormals below it, spaced 2**(emin - mbits).
F32 = (23, -126)
BF16 = (7, -126)
F16 = (10, -14)
_TOP = {F32: float(np.finfo(np.float32).max), BF16: (2.0 - 2.0 ** -7) * 2.0 ** 127, F16: 65504.0}


def _round(v: np.ndarray, fmt) -> np.ndarray:
    """v (float64, exact or rounded to odd) rounded to nearest even into fmt, as a float64 (+-inf past its range)."""
    mbits, emin = fmt
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = np.frexp(v)
        quantum = np.maximum(e - 1, emin) - mbits
        r = np.ldexp(np.rint(np.ldexp(v, -quantum)), quantum)
    top = _TOP[fmt]
    return np.where(np.isfinite(v) & (np.abs(r) > top), np.copysign(np.inf, v), np.where(np.isfinite(v), r, v))


def _odd_sum(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    """p + c (float64) rounded to odd: exact where float64 holds it, else the odd one of its two neighbours."""
    with np.errstate(invalid="ignore"):
        s = p + c
        b = s - p
        err = (p - (s - b)) + (c - b)
    inexact = np.isfinite(s) & (err != 0)
    even = (s.view(np.uint64) & np.uint64(1)) == 0
    toward = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
    return np.where(inexact & even, toward, s)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=U32).view(np.float32).astype(np.float64)


def _f32_bits(v: np.ndarray) -> np.ndarray:
    r = _round(v, F32)
    out = r.astype(np.float32).view(U32)
    return np.where(np.isnan(v), U32(0x7FFFFFFF), out)


def _half_value(h, fmt) -> np.ndarray:
    h = np.asarray(h, dtype=U32)
    if fmt == BF16:
        return (h << U32(16)).view(np.float32).astype(np.float64)
    return h.astype(np.uint16).view(np.float16).astype(np.float64)


def _half_bits(v: np.ndarray, fmt) -> np.ndarray:
    r = _round(v, fmt)
    if fmt == BF16:
        out = r.astype(np.float32).view(U32) >> U32(16)
    else:
        out = r.astype(np.float16).view(np.uint16).astype(U32)
    return np.where(np.isnan(v), U32(0x7FFF), out)


def _x2(f, fmt):
    """An op on each half of its operands' 16-bit pairs: f of their values (float64), rounded once into fmt."""
    def op(*args):
        halves = [_halves(a) for a in args]
        with np.errstate(invalid="ignore", over="ignore"):
            lo = f(*(_half_value(h[0], fmt) for h in halves))
            hi = f(*(_half_value(h[1], fmt) for h in halves))
        return _join(_half_bits(lo, fmt), _half_bits(hi, fmt))
    return op


def _fma(a, b, c):
    with np.errstate(invalid="ignore", over="ignore"):
        return _f32_bits(_odd_sum(_f32(a) * _f32(b), _f32(c)))  # the product is exact in float64


def _fmin(a, b):
    """min.f32: the other operand where one is NaN."""
    x, y = _f32(a), _f32(b)
    r = np.where(np.isnan(x), y, np.where(np.isnan(y), x, np.minimum(x, y)))
    return np.where(np.isnan(r), U32(0x7FFFFFFF), r.astype(np.float32).view(U32))


def _extreme_nan(pick):
    """max.NaN / min.NaN of halves (pick: np.maximum or np.minimum): NaN where either is NaN; of two zeros, +0 the
    larger."""
    def f(x, y):
        zeros = (x == 0) & (y == 0)
        signed = pick(np.copysign(1.0, x), np.copysign(1.0, y)) * 0.0  # the zero of the picked sign
        return np.where(np.isnan(x) | np.isnan(y), np.nan, np.where(zeros, signed, pick(x, y)))
    return f


def _prmt(a, b, c):
    """prmt.b32 (default mode): byte i of the result is byte c[4i+2:4i] of {b, a} (a's bytes 0-3, b's 4-7),
    or that byte's sign bit replicated where c[4i+3] is set."""
    source = [(np.asarray(v, dtype=U32) >> U32(8 * k)) & U32(0xFF) for v in (a, b) for k in range(4)]
    c = np.asarray(c, dtype=U32)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=U32)
    for i in range(4):
        sel = (c >> U32(4 * i)) & U32(0xF)
        byte = np.choose((sel & U32(7)).astype(np.intp), source)
        byte = np.where(sel & U32(8), np.where(byte & U32(0x80), U32(0xFF), U32(0)), byte)
        out |= byte.astype(U32) << U32(8 * i)
    return out


def _cvt_x2(fmt):
    def op(hi, lo):  # cvt.rn.{bf16,f16}x2.f32 d, a, b: a into the upper half
        return _join(_half_bits(_f32(lo), fmt), _half_bits(_f32(hi), fmt))
    return op


_OPS = {
    "mov.b32": lambda a: a,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "shl.b32": lambda a, b: _low32(_u64(a) << np.minimum(_u64(b), 32)),
    "shr.u32": lambda a, b: _low32(_u64(a) >> np.minimum(_u64(b), 32)),
    "add.u32": lambda a, b: _low32(_u64(a) + _u64(b)),
    "add.s32": lambda a, b: _low32(_u64(a) + _u64(b)),  # the same bits
    "sub.u32": lambda a, b: _low32(_u64(a) - _u64(b) + np.uint64(1 << 32)),
    "mul.lo.u32": lambda a, b: _low32(_u64(a) * _u64(b)),
    "mad.lo.s32": lambda a, b, c: _low32(_u64(a) * _u64(b) + _u64(c)),
    "prmt.b32": _prmt,
    "max.u32": lambda a, b: np.maximum(a, b),
    "min.u32": lambda a, b: np.minimum(a, b),
    "max.u16x2": _u16x2(np.maximum),
    "min.u16x2": _u16x2(np.minimum),
    "abs.f32": lambda a: np.asarray(a, dtype=U32) & U32(0x7FFFFFFF),
    "min.f32": _fmin,
    "mul.rn.f32": lambda a, b: _f32_bits(_f32(a) * _f32(b)),  # exact in float64
    "fma.rn.f32": _fma,
    "add.rn.f32": lambda a, b: _f32_bits(_odd_sum(_f32(a), _f32(b))),
    "mul.rn.bf16x2": _x2(lambda x, y: x * y, BF16),
    "add.rn.bf16x2": _x2(_odd_sum, BF16),
    "fma.rn.bf16x2": _x2(lambda x, y, z: _odd_sum(x * y, z), BF16),  # bf16 products are exact in float64
    "max.NaN.bf16x2": _x2(_extreme_nan(np.maximum), BF16),
    "min.NaN.bf16x2": _x2(_extreme_nan(np.minimum), BF16),
    "cvt.rn.bf16x2.f32": _cvt_x2(BF16),
    "cvt.rn.f16x2.f32": _cvt_x2(F16),
}
