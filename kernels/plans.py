"""Launch plans: the kernels a call launches, recorded once for its key and replayed without its Python.

A quantize of a 1024^2 tensor spends ~100-250 us on the host (our planning, Triton's binder and launch checks)
against a few microseconds of GPU time; every tensor below ~256 MiB is bound by it. `planned(key, roots, body)`
runs `body` the first time a key is seen and records each `launch` it makes: the compiled kernel, its grid and its
arguments, each tensor argument (and a TMA descriptor's base, the descriptor rebuilt at each replay) as a byte
offset into one of the call's `roots` (its input, outputs, explicit scales) or into a `scratch` buffer. Later calls
with that key refill those pointers and launch the compiled kernels directly (Triton's own launcher,
`CompiledKernel[grid]`): ~10-20 us a launch.

The key must fix every decision the body makes: callers key on shapes, strides, dtypes, devices, specs and
configs, and `planned` adds each root's address modulo 16 (Triton specializes pointers on 16-byte alignment).
A body that does more than launch kernels on its roots (a torch operation that computes or copies, a read of a
value, an argument outside the roots) is not replayable: a dispatch mode watches the recording for such
operations, and such keys run their body every time. Under the interpreter, plans replay by calling the kernels
with views rebuilt over the roots, so CI exercises the same records. QUANTD_PLANS=0 turns plans off.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import os
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .launch import interpreting

MAX_PLANS = 4096
_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_strided}
_local = threading.local()


@dataclasses.dataclass(frozen=True)
class _Pointer:
    """A tensor argument: `offset` bytes past the address of the call's root tensor number `root`; dtype, size and
    stride rebuild it over that root (interpreter)."""
    root: int
    offset: int
    dtype: torch.dtype
    size: tuple
    stride: tuple


@dataclasses.dataclass(frozen=True)
class _Descriptor:
    """A tensor descriptor argument (a dataclass whose `base` is a tensor: triton's and Gluon's TensorDescriptor):
    its base as a _Pointer, its other fields as they were."""
    kind: type
    base: _Pointer
    fields: tuple  # (name, value) of every field but base

    def rebuild(self, roots: list[torch.Tensor]):
        return self.kind(base=_rebuild(roots[self.base.root], self.base), **dict(self.fields))


@dataclasses.dataclass
class _Launch:
    kernel: object  # the JITFunction
    grid: tuple
    values: list  # every parameter's value in order (constexprs too, as Triton's launcher takes them)
    pointers: list  # (parameter index, _Pointer or _Descriptor)
    options: dict  # num_warps, maxnreg, ...: for the interpreter's replay
    runner: object = None  # CompiledKernel[grid], compiled only

    def run(self, roots: list[torch.Tensor]) -> None:
        values = self.values.copy()
        if self.runner is not None:
            for i, p in self.pointers:
                values[i] = p.rebuild(roots) if isinstance(p, _Descriptor) else roots[p.root].data_ptr() + p.offset
            self.runner(*values)
            return
        for i, p in self.pointers:
            values[i] = p.rebuild(roots) if isinstance(p, _Descriptor) else _rebuild(roots[p.root], p)
        self.kernel[self.grid](**dict(zip(_parameters(self.kernel)[0], values)), **self.options)


def _is_descriptor(v) -> bool:
    """A tensor descriptor: a dataclass over a tensor `base` (triton.tools.tensor_descriptor, Gluon's)."""
    return dataclasses.is_dataclass(v) and isinstance(getattr(v, "base", None), torch.Tensor)


def _rebuild(root: torch.Tensor, p: _Pointer) -> torch.Tensor:
    start = root.storage_offset() * root.element_size() + p.offset
    view = torch.empty(0, dtype=p.dtype, device=root.device)
    return view.set_(root.untyped_storage(), start // view.element_size(), p.size, p.stride)


@functools.lru_cache(maxsize=None)
def _parameters(kernel) -> tuple[list, list, list]:
    """Names, defaults and constexpr flags of a Triton kernel's parameters (jitted or interpreted: the Python
    function's; annotations may be strings)."""
    params = inspect.signature(kernel.fn).parameters.values()
    return ([p.name for p in params], [p.default for p in params],
            ["constexpr" in str(p.annotation) for p in params])


class _Recording(TorchDispatchMode):
    """The launches of a body being recorded, and the first operation that keeps it from replaying."""

    def __init__(self, roots: list[torch.Tensor]):
        super().__init__()
        self.roots = list(roots)
        self.scratch: list[tuple] = []  # (numel, dtype) of each zeroed buffer, roots after the call's own
        self.launches: list[_Launch] = []
        self.refused: str | None = None
        self.inside = 0  # > 0 while a kernel or a scratch allocation runs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and not func.is_view and func.overloadpacket not in _ALLOCATIONS:
            self.refused = self.refused or f"{func} outside a kernel"
        return func(*args, **(kwargs or {}))

    def add(self, kernel, compiled, grid, args, kwargs) -> None:
        names, defaults, constexprs = _parameters(kernel)
        values = [args[i] if i < len(args) else kwargs.get(n, defaults[i]) for i, n in enumerate(names)]
        if any(v is inspect.Parameter.empty for v in values):
            self.refused = self.refused or "a parameter without a value"
            return
        pointers = []
        for i, v in enumerate(values):
            if not constexprs[i] and _is_descriptor(v):
                p = self._pointer(v.base)
                if p is None:
                    self.refused = self.refused or f"argument {names[i]}'s base is not a view of the call's tensors"
                    return
                fields = tuple((f.name, getattr(v, f.name)) for f in dataclasses.fields(v)
                               if f.init and f.name != "base")
                pointers.append((i, _Descriptor(type(v), p, fields)))
                values[i] = None
                continue
            if not constexprs[i] and not isinstance(v, (torch.Tensor, int, float, type(None))):
                # an object that may hold an address of this call's: never kept
                self.refused = self.refused or f"argument {names[i]} is a {type(v).__name__}"
                return
            if isinstance(v, torch.Tensor):
                p = self._pointer(v)
                if p is None:
                    self.refused = self.refused or f"argument {names[i]} is not a view of the call's tensors"
                    return
                pointers.append((i, p))
                values[i] = None
        grid = tuple(grid) + (1,) * (3 - len(grid))
        options = {k: v for k, v in kwargs.items() if k not in names}
        runner = None if compiled is None or interpreting() else compiled[grid]
        self.launches.append(_Launch(kernel, grid, values, pointers, options, runner))

    def _pointer(self, t: torch.Tensor) -> _Pointer | None:
        """t as an offset into the one root whose memory holds its first element (roots may share a storage, as
        outputs carved from one buffer do; None where no root, or more than one, holds it)."""
        found = None
        for r, root in enumerate(self.roots):
            if root is None or root.device != t.device or not root.numel() or \
                    root.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                continue
            span = (sum((n - 1) * abs(s) for n, s in zip(root.shape, root.stride())) + 1) * root.element_size()
            if root.data_ptr() <= t.data_ptr() < root.data_ptr() + span:
                if found is not None:
                    return None
                found = _Pointer(r, t.data_ptr() - root.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        return found


class _Plan:
    def __init__(self, recording: _Recording):
        self.scratch = recording.scratch
        self.launches = recording.launches

    def run(self, roots: list, device) -> None:
        roots = list(roots) + [torch.zeros(n, dtype=dtype, device=device) for n, dtype in self.scratch]
        for launch in self.launches:
            launch.run(roots)


_plans: collections.OrderedDict = collections.OrderedDict()
counts: collections.Counter = collections.Counter()  # planned()'s outcomes: "replayed", "recorded", "ran"
_plans_lock = threading.Lock()
_REFUSED = object()


def enabled() -> bool:
    return os.environ.get("QUANTD_PLANS", "1") != "0"


def planned(key: tuple, roots: list, device, body) -> str:
    """Run body() (which launches kernels on `roots` through `launch`) or replay its plan for `key`; roots may hold
    None. Returns how: "replayed", "recorded" or, where the body cannot be replayed (or plans are off), "ran"."""
    how = _planned(key, roots, device, body)
    counts[how] += 1
    return how


def _planned(key: tuple, roots: list, device, body) -> str:
    if not enabled() or getattr(_local, "recording", None) is not None:
        body()
        return "ran"
    key = key + tuple(None if r is None else r.data_ptr() % 16 for r in roots)
    try:
        with _plans_lock:
            plan = _plans.get(key)
    except TypeError:  # an unhashable key (a config holding a list, say): no plan
        plan = _REFUSED
    if plan is _REFUSED:
        body()
        return "ran"
    if plan is not None:
        plan.run(roots, device)
        return "replayed"
    recording = _Recording(roots)
    _local.recording = recording
    try:
        with recording:
            body()
    finally:
        _local.recording = None
    with _plans_lock:
        _plans[key] = _REFUSED if recording.refused else _Plan(recording)
        if len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return "recorded"


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), recorded into the plan this thread is making."""
    recording = getattr(_local, "recording", None)
    if recording is None:
        kernel[grid](*args, **kwargs)
        return
    recording.inside += 1
    try:
        compiled = kernel[grid](*args, **kwargs)
    finally:
        recording.inside -= 1
    recording.add(kernel, compiled, grid, args, kwargs)


def scratch(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed buffer of a call's own (statistics, lists of tiles), allocated again at each replay."""
    recording = getattr(_local, "recording", None)
    if recording is None:
        return torch.zeros(numel, dtype=dtype, device=device)
    recording.inside += 1
    try:
        t = torch.zeros(numel, dtype=dtype, device=device)
    finally:
        recording.inside -= 1
    recording.roots.append(t)
    recording.scratch.append((numel, dtype))
    return t


def clear() -> None:
    with _plans_lock:
        _plans.clear()
