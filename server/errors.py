"""The one place where a failure becomes a gRPC status.

ServiceError carries a status chosen where the problem is found (limits, stream order,
draining); a chunk whose CRC32C is wrong is DATA_LOSS; ValueError/TypeError (the kernels',
malformed messages, chunks that do not fit) mean bad input; running out of memory (an
allocation that fails, on the host or the GPU) is RESOURCE_EXHAUSTED; anything else is INTERNAL.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc
import torch

from quantd.protocol.chunks import ChecksumMismatch

log = logging.getLogger("quantd.server")


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def status_of(exc: Exception) -> tuple:
    """(grpc.StatusCode, message) for an exception raised while serving a call."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, ChecksumMismatch):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or _allocation_failed(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def _allocation_failed(exc: Exception) -> bool:
    """torch's CPU allocator reports a failed allocation as a RuntimeError."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def grpc_status(method):
    """Wrap a servicer method (coroutine or async generator) so that errors end the call with status_of()."""
    async def fail(context, exc):
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__name__, exc_info=exc)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 (every failure gets a status)
                await fail(context, exc)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await fail(context, exc)
    return unary
