"""Which of a server's devices serves a request, and each device's load.

A request whose CUDA IPC input is on one of the devices runs there (its bytes need not cross GPUs); any other goes
to the least loaded device: fewest tensor bytes in flight, then fewest requests in flight, then the lowest index.
Plain Python, used from the event loop thread only.
"""
from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class DeviceLoad:
    name: str
    requests_in_flight: int = 0
    bytes_in_flight: int = 0
    requests_total: int = 0


@dataclasses.dataclass(frozen=True)
class Placed:
    index: int
    reason: str       # "the input's GPU", "least loaded", "the only device"


class Placement:
    def __init__(self, names):
        if not names:
            raise ValueError("a server needs at least one device")
        self.loads = [DeviceLoad(name) for name in names]

    def choose(self, preferred: int | None = None) -> Placed:
        if len(self.loads) == 1:
            return Placed(0, "the only device")
        if preferred is not None:
            return Placed(preferred, "the input's GPU")
        index = min(range(len(self.loads)), key=lambda i: (self.loads[i].bytes_in_flight,
                                                            self.loads[i].requests_in_flight, i))
        return Placed(index, "least loaded")

    @contextlib.contextmanager
    def hold(self, nbytes: int, preferred: int | None = None):
        """The Placed device of a request of `nbytes`, counted in its load until the block ends."""
        placed = self.choose(preferred)
        load = self.loads[placed.index]
        load.requests_in_flight += 1
        load.bytes_in_flight += nbytes
        load.requests_total += 1
        try:
            yield placed
        finally:
            load.requests_in_flight -= 1
            load.bytes_in_flight -= nbytes
