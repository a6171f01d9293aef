"""The Triton interpreter's calls of jit functions inside a kernel, without walking triton.language again each time.

The interpreter patches triton.language (its builtins, tensor methods, math) before it runs a kernel's grid and
restores it after. A call of a @triton.jit helper inside the kernel runs the same patching again: inspect.getmembers
over each module, members already patched skipped. That walk is most of the time of a kernel of many helper calls: a
profile of test_delayed_words spent 124 s of 449 in 314,477 such walks, one per helper call per program.

install() keeps, per thread, the modules (triton.language, triton.language.core) that the current grid's run has
patched: a helper call inside the run whose modules are among them does not patch again; anything else (the run's
first patching, a helper that sees a module the run has not patched, a call outside a run) patches as before. The
run's restore is unchanged: it puts back what its first patching replaced.
"""
from __future__ import annotations

import inspect
import threading

_run = threading.local()  # .modules: ids of the modules the current grid run of this thread patched; None outside


def install() -> None:
    """Patch once a run in the Triton interpreter (idempotent; a triton without these internals is left as it is)."""
    from triton.runtime import interpreter
    executor = getattr(interpreter, "GridExecutor", None)
    patch = getattr(interpreter, "_patch_lang", None)
    if executor is None or patch is None or getattr(patch, "once_a_run", False):
        return
    import triton.language as tl
    languages = (tl, tl.core)

    def _patch_lang(fn):
        modules = getattr(_run, "modules", None)
        seen = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages}
        if modules is not None and seen <= modules:
            return interpreter._LangPatchScope()  # nothing to restore: the run's own patching stays in place
        if modules is not None:
            modules |= seen
        return patch(fn)

    run = executor.__call__

    def __call__(self, *args, **kwargs):
        outer = getattr(_run, "modules", None)
        _run.modules = set()
        try:
            return run(self, *args, **kwargs)
        finally:
            _run.modules = outer

    _patch_lang.once_a_run = True
    interpreter._patch_lang = _patch_lang
    executor.__call__ = __call__
