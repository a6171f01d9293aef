"""tests/interpreter_reduce.py: the interpreter's reductions by halves give the element-by-element results, for the
kernels' kinds of combine functions (NaN-propagating maxima and minima of floats, u16x2 maxima of words through the
PTX model), along each axis, with keep_dims, and over a whole tensor."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import interpreter_reduce
from quantd.kernels.triton_elements import max_nan, max_u16x2, min_nan

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's reductions: CPU only")


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr, OP: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    if OP == 0:
        a, b, c = tl.reduce(x, 0, max_nan), tl.reduce(x, 1, min_nan), tl.reduce(x, None, max_nan)
        k = tl.reduce(x, 1, max_nan, keep_dims=True)
    else:
        a, b, c = tl.reduce(x, 0, max_u16x2), tl.reduce(x, 1, max_u16x2), tl.reduce(x, None, max_u16x2)
        k = tl.reduce(x, 1, max_u16x2, keep_dims=True)
    tl.store(out_ptr + tl.arange(0, C), a)
    tl.store(out_ptr + C + tl.arange(0, R), b)
    tl.store(out_ptr + C + R, c)
    tl.store(out_ptr + C + R + 1 + tl.arange(0, R)[:, None], k)


@pytest.mark.parametrize("op", [0, 1], ids=["float_nan", "u16x2"])
@pytest.mark.parametrize("shape", [(1, 16), (8, 32), (64, 2)], ids=str)
def test_by_halves_matches_element_by_element(op, shape, rng, monkeypatch):
    from triton.runtime import interpreter
    assert interpreter.ReduceOps.generic_reduce.by_halves
    R, C = shape
    if op == 0:
        x = torch.randn(R, C, generator=rng)
        x.view(-1)[torch.randperm(R * C, generator=rng)[:R * C // 8]] = float("nan")
        x.view(-1)[torch.randperm(R * C, generator=rng)[:R * C // 8]] = -0.0
    else:
        x = torch.randint(-2 ** 31, 2 ** 31 - 1, (R, C), generator=rng, dtype=torch.int64).to(torch.int32)
    runs = []
    for reduce in (interpreter_reduce.ELEMENTWISE, interpreter.ReduceOps.generic_reduce):
        monkeypatch.setattr(interpreter.ReduceOps, "generic_reduce", reduce)
        out = torch.zeros(C + 2 * R + 1, dtype=x.dtype)
        _reduce_kernel[(1,)](x, out, R, C, op)
        runs.append(out)
    np.testing.assert_array_equal(runs[0].view(torch.int32).numpy(), runs[1].view(torch.int32).numpy())
    if op == 0:  # and both are the maxima and minima
        want = torch.cat([x.amax(0), x.amin(1), x.amax().reshape(1), x.amax(1)])
        assert torch.equal(runs[1].isnan(), want.isnan())
        assert torch.equal(runs[1].nan_to_num(), want.nan_to_num())
