import os
import sys

# The repository root holds the folder `kernels` (installed as quantd.kernels). `python -m pytest` puts the root on
# sys.path, where that folder would shadow the `kernels` package that transformers imports (a dependency of
# transformers 5.25): the tests import quantd as installed, never from the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Under pytest-xdist (`-n N`, the GPU runs) each worker takes its share of the cores for torch's CPU work (the
# reference's), instead of every worker starting a thread a core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
if not HAS_CUDA:
    # Without a GPU the Triton kernels run under the interpreter; triton reads this at import. Their inline PTX runs
    # through tests/ptx_model.py there (the GPU tests compare the compiled PTX with the reference).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import interpreter_calls  # noqa: E402
    import interpreter_reduce  # noqa: E402
    import ptx_model  # noqa: E402

    ptx_model.install()
    interpreter_reduce.install()  # reductions by a combine function over numpy arrays, not an element at a time
    interpreter_calls.install()  # helper calls inside a kernel's run without patching triton.language again


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS and printed so that a failure can be replayed: the seed in
    QUANTD_TEST_SEED seeds every test's generator instead."""
    seed = int(os.environ.get("QUANTD_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"torch seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.fixture
def processes():
    """A list for the test's grpc_harness.ServerProcess servers: each is closed (killed) after the test."""
    started = []
    yield started
    for server in started:
        server.close()
