"""Repeated CUDA IPC calls replayed: a training job that quantizes the same buffers step after step sends the same
request again and again, and the server serves it from a plan instead of checking, opening and launching anew.

A call on the local socket whose tensors are all kept CUDA IPC storages on the GPU that computes it (the call
launched from the event loop, `here`), and whose Summary holds nothing computed (no report, no amax), leaves a
Plan: its checked header, the opened views, the function that launches its kernels and its answer. The same
request bytes again (a later call on the same kept storages and result buffer: byte for byte the same header)
are served from the plan: admitted as any call, its kernels launched from a CUDA graph captured on its first
replay (the plain launch where capture fails), the answer sent back as it was. A plan belongs to the session's
Kept storages and goes with any change to them (a storage released or let go, the session's end): a request
that names a storage the server no longer keeps never matches one.
"""
from __future__ import annotations

import collections
import contextvars
import dataclasses
import logging

import torch

log = logging.getLogger("quantd.server")

PLANS = 8  # plans a session keeps, the most recently used last

# Set by the local socket around serving a request: a list that the call appends its Offer to when it can be
# replayed
offers: contextvars.ContextVar = contextvars.ContextVar("quantd_replay_offers", default=None)


@dataclasses.dataclass
class Offer:
    """What a served call leaves for its replays: its header and bytes admitted (to admit it again) and the
    function that launches its kernels on the views it opened (the views kept alive by it)."""
    rpc: str
    header: object
    nbytes: int
    launch: object


@dataclasses.dataclass
class Plan:
    offer: Offer
    response: bytes                     # the answer, framed as the local socket sends it
    keys: tuple                         # the kept storages it uses, as Kept keys them
    graph: torch.cuda.CUDAGraph | None = None
    captured: bool = False              # capture tried (graph None: it failed, launch plainly)

    def run(self) -> None:
        """Launch the call's kernels on the current stream: from the graph, captured on the first run."""
        if not self.captured:
            self.captured = True
            self.graph = _capture(self.offer.launch)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.offer.launch()


def _capture(launch):
    """A CUDA graph of launch()'s kernels on the current stream, or None where they cannot be captured. Capture
    errors are this thread's alone (the server's other threads keep using the GPU meanwhile)."""
    try:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            launch()
        finally:
            graph.capture_end()
    except Exception as exc:  # noqa: BLE001 (the plain launch serves instead)
        log.debug("replay: cannot capture a CUDA graph, launching plainly: %s", exc)
        return None
    return graph


def keys(msg) -> tuple:
    """The Kept keys of the storages a request's CudaTensors `msg` names."""
    return tuple((t.handle, t.storage_offset_bytes) for t in (*msg.inputs, *msg.outputs))


class Plans:
    """A session's plans by request bytes, bounded (PLANS), the most recently used last."""

    def __init__(self):
        self.by_request: collections.OrderedDict = collections.OrderedDict()

    def get(self, request: bytes) -> Plan | None:
        plan = self.by_request.get(request)
        if plan is not None:
            self.by_request.move_to_end(request)
        return plan

    def add(self, request: bytes, plan: Plan) -> None:
        self.by_request[request] = plan
        self.by_request.move_to_end(request)
        while len(self.by_request) > PLANS:
            self.by_request.popitem(last=False)

    def clear(self) -> None:
        self.by_request.clear()
