"""The Triton interpreter's tl.reduce with a combine function, taken over halves of the axis (numpy arrays at once)
rather than element by element.

The interpreter runs a reduction by a jit function (the kernels' NaN-propagating minima and maxima, the u16x2 and
bf16x2 ones of the word kernels) as one Python call of the function an element: 65,472 calls of max_u16x2 through
tests/ptx_model.py took 9.9 s. install() replaces it by a tree: the function applied to the even and the odd
positions of the axis at once, halving the axis until one position is left (16 calls for 65,536). For an associative
and commutative function (a minimum, a maximum) that is the element-by-element result, as the GPU's own order of
reduction gives it too.
"""
from __future__ import annotations

import numpy as np


def install() -> None:
    """Reduce by halves in the Triton interpreter (idempotent; a triton without the method is left as it is)."""
    from triton.runtime import interpreter
    ops = getattr(interpreter, "ReduceOps", None)
    if ops is not None and hasattr(ops, "generic_reduce") and hasattr(ops, "unravel"):
        if not getattr(ops.generic_reduce, "by_halves", False):
            global ELEMENTWISE
            ELEMENTWISE = ops.generic_reduce
            ops.generic_reduce = _generic_reduce


ELEMENTWISE = None  # the interpreter's own generic_reduce, once install() replaced it


def _combine(self, dtypes, a, b):
    """The combine function of self on the tensors a and b (numpy arrays of one shape), as numpy arrays."""
    got = self.combine_fn.fn(*(self.to_tensor(x, t) for x, t in zip(a, dtypes)),
                             *(self.to_tensor(x, t) for x, t in zip(b, dtypes)))
    got = got if isinstance(got, tuple) else (got,)
    return [np.broadcast_to(g.handle.data if hasattr(g, "handle") else np.asarray(g), x.shape).astype(x.dtype)
            for g, x in zip(got, a)]


def _generic_reduce(self, input):
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    dtypes = [arg.dtype for arg in input]
    input_shape = input[0].handle.data.shape
    data = [np.moveaxis(arg.handle.data, axis, 0) for arg in input]
    while data[0].shape[0] > 1:
        n = data[0].shape[0]
        pairs = _combine(self, dtypes, [d[0:n - 1:2] for d in data], [d[1:n:2] for d in data])
        data = [np.concatenate([p, d[n - 1:]]) if n % 2 else p for p, d in zip(pairs, data)]
    ret = []
    for i, d in enumerate(data):
        d = d[0]
        if self.keep_dims:
            if original_axis is not None:
                d = np.expand_dims(d, axis)
            else:
                for _ in range(len(input_shape)):
                    d = np.expand_dims(d, 0)
        elif original_axis is None:
            d = d.item()
        ret.append(self.to_tensor(d, input[i].dtype))
    return ret


_generic_reduce.by_halves = True
