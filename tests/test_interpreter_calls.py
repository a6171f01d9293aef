"""tests/interpreter_calls.py: an interpreted kernel's helper calls do not patch triton.language again, the results are
the same, and the run's restore leaves triton.language as it was."""
import pytest
import torch
import triton
import triton.language as tl

from quantd.kernels.launch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="the Triton interpreter's patching (CI)")


@triton.jit
def _doubled(x):
    return tl.where(x == x, x * 2, tl.abs(x))


@triton.jit
def _kernel(x_ptr, y_ptr, N: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * N + tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for _ in tl.static_range(5):
        x = _doubled(x)
    tl.store(y_ptr + offs, x + tl.max(x))


def test_helpers_patch_once_a_run(monkeypatch):
    from triton.runtime import interpreter
    assert getattr(interpreter._patch_lang, "once_a_run", False), "conftest installs interpreter_calls"
    walks = []
    walk = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: walks.append(1) or walk(*a))
    interpreter._patch_lang(_kernel.fn).restore()  # one patching, outside a run
    one = len(walks)
    assert one > 0
    counts = []
    for programs in (1, 1, 3):  # the first run rewrites the helpers (which adds names to their modules' globals)
        walks.clear()
        x = torch.randn(programs, 64)
        y = torch.empty_like(x)
        _kernel[(programs,)](x, y, N=64)
        counts.append(len(walks))
    # the run's own patching, and tl.max's combine function's module (triton.language.core) once: not again for
    # each of the 5 helper calls a program nor for each program
    assert counts[1] == counts[2] < 3 * one, (one, counts)
    want = x * 32
    assert torch.equal(y, want + want.amax(dim=1, keepdim=True))
    assert tl.core.is_builtin(tl.abs) and tl.core.is_builtin(tl.where)  # restored after the run
