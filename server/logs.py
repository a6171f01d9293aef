"""Structured logging for the quantd server: text or JSON lines, each carrying the request id of the RPC it belongs to.

configure(log_format) installs the handler on the "quantd" logger; request_id(context) gives the id of the RPC being
served (the client's "x-request-id" metadata, or a fresh uuid4 hex); log_request() writes the one access line per RPC.
"""
from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import uuid

LOG_FORMATS = ("text", "json")
REQUEST_ID_METADATA = "x-request-id"
_MAX_REQUEST_ID = 128

# The id of the RPC being served. grpc.aio runs each RPC in its own task, so a context variable set while handling
# it is seen by everything the handler calls (and by tasks it spawns), and by nothing else.
_current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("quantd_request_id", default=None)

# Record attributes that log_request() and callers' `extra=` add; both formatters print them when present.
FIELDS = ("request_id", "rpc", "status", "bytes_in", "bytes_out", "seconds", "peer")

logger = logging.getLogger("quantd")


class _RequestIdFilter(logging.Filter):
    """Stamps every record with the current RPC's request id, so servicer log lines carry it without passing it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the FIELDS present, and exc when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`<ts> <level> <logger> <message> key=value ...` for the FIELDS present."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        pairs = [f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None) is not None]
        if not pairs:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the key=value pairs
        return f"{head} {' '.join(pairs)}{sep}{tail}"


def configure(log_format: str = "text", level: int | str = logging.INFO, stream=None) -> None:
    """Send the "quantd" loggers' records to `stream` (stderr) as text or JSON lines; calling it again replaces the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    handler.quantd_handler = True  # marks the handler this function owns, so a second call replaces only it
    for old in [h for h in logger.handlers if getattr(h, "quantd_handler", False)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _metadata_request_id(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            # A client-chosen id ends up in log lines: keep it short and printable.
            value = "".join(ch for ch in value if ch.isprintable() and not ch.isspace())[:_MAX_REQUEST_ID]
            return value or None
    return None


def request_id(context=None) -> str:
    """The id of the RPC being served: the one already assigned to it, else the client's "x-request-id" metadata,
    else a new uuid4 hex. `context` is the RPC's grpc.aio.ServicerContext (may be None outside an RPC)."""
    rid = _current_request_id.get()
    if rid is None:
        rid = (_metadata_request_id(context) if context is not None else None) or uuid.uuid4().hex
        _current_request_id.set(rid)
    return rid


def begin_request(context) -> str:
    """Assigns the request id for a new RPC (called once at its start, before the servicer runs) and returns it."""
    _current_request_id.set(None)
    return request_id(context)


def log_request(*, rpc: str, status: str, seconds: float, bytes_in: int = 0, bytes_out: int = 0,
                peer: str | None = None, request_id: str | None = None) -> None:
    """The access line for one finished RPC, at INFO for OK and WARNING for any other status."""
    level = logging.INFO if status == "OK" else logging.WARNING
    logger.getChild("access").log(level, "rpc finished", extra={
        "request_id": request_id or _current_request_id.get(), "rpc": rpc, "status": status,
        "bytes_in": bytes_in, "bytes_out": bytes_out, "seconds": round(seconds, 6), "peer": peer,
    })
