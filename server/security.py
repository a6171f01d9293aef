"""Transport security and bearer-token authentication for the quantd server. Both are off unless configured.

server_credentials(config) -> grpc.ServerCredentials for TLS (mutual TLS when a client CA is set), or None (plaintext).
auth_interceptor(config)   -> an interceptor accepting only calls with "authorization: Bearer <token>" metadata
                              for one of the configured tokens, or None when no token is configured.
The health service and server reflection stay open: load balancers and probes call them without a token.
`config` is a ServerConfig (or anything with its attributes: tls_cert_file, tls_key_file, tls_client_ca_file,
auth_tokens and optionally auth_tokens_file).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

import grpc

from . import logs
from .metrics import split_method, wrap_handler

# Method prefixes callable without a token.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
AUTHORIZATION_METADATA = "authorization"
_BEARER = "bearer "

log = logging.getLogger("quantd.security")


def _read_file(path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!s}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise ValueError(f"{what} {path!s} is empty")
    return data


def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS credentials from config.tls_cert_file/tls_key_file (PEM); with config.tls_client_ca_file the server also
    requires a client certificate signed by that CA. None when no certificate is configured (serve plaintext)."""
    cert_file = getattr(config, "tls_cert_file", None)
    key_file = getattr(config, "tls_key_file", None)
    client_ca_file = getattr(config, "tls_client_ca_file", None)
    if not cert_file and not key_file:
        if client_ca_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file as well")
        return None
    if not cert_file or not key_file:
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    certificate_chain = _read_file(cert_file, "TLS certificate file")
    private_key = _read_file(key_file, "TLS key file")
    client_ca = _read_file(client_ca_file, "TLS client CA file") if client_ca_file else None
    return grpc.ssl_server_credentials([(private_key, certificate_chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def load_tokens(config) -> tuple[str, ...]:
    """The accepted tokens: config.auth_tokens plus one per non-empty line of config.auth_tokens_file (if any)."""
    tokens = [t.strip() for t in (getattr(config, "auth_tokens", None) or ())]
    tokens_file = getattr(config, "auth_tokens_file", None)
    if tokens_file:
        tokens += [line.strip() for line in _read_file(tokens_file, "auth tokens file").decode().splitlines()]
    tokens = tuple(dict.fromkeys(t for t in tokens if t))
    for token in tokens:
        if any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError("auth tokens must be printable and contain no whitespace")
    return tokens


def auth_interceptor(config) -> grpc.aio.ServerInterceptor | None:
    """A BearerTokenInterceptor for the configured tokens, or None when there are none (authentication off)."""
    tokens = load_tokens(config)
    return BearerTokenInterceptor(tokens) if tokens else None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid "authorization: Bearer <token>" with UNAUTHENTICATED, except OPEN_METHOD_PREFIXES."""

    def __init__(self, tokens: Iterable[str]):
        # Compare fixed-length digests so neither a token's content nor its length shows in the comparison time.
        self._digests = tuple(_digest(t) for t in tokens)
        if not self._digests:
            raise ValueError("BearerTokenInterceptor needs at least one token")

    def authorized(self, metadata) -> bool:
        """True when `metadata` (the call's invocation metadata) carries one of the accepted tokens."""
        presented = None
        for key, value in metadata or ():
            if key == AUTHORIZATION_METADATA:
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                if value[:len(_BEARER)].lower() == _BEARER:
                    presented = value[len(_BEARER):].strip()
                break
        if not presented:
            return False
        candidate = _digest(presented)
        match = False
        for digest in self._digests:  # no early exit: the time does not tell which token matched
            match |= hmac.compare_digest(candidate, digest)
        return match

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _rejecting_handler(handler, method)


def _rejecting_handler(handler, method: str):
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED without reading the request."""
    def wrap(_behavior):
        async def reject(_request, context):
            log.warning("unauthenticated call rejected", extra={"rpc": split_method(method)[1], "peer": context.peer(),
                                                                "request_id": logs.request_id(context)})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
        return reject

    return wrap_handler(handler, wrap, parse_requests=False)  # a rejected call's request is never parsed
