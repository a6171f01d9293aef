import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Without a GPU the Triton kernels run under the interpreter; triton reads this at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS and printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
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
