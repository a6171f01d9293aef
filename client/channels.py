"""gRPC channels to one or several quantd servers, with TLS and a bearer token when asked for.

make_channel("host:port")                      one server (a name resolving to several addresses: all of them)
make_channel("dns:///quantd-headless:50051")   every address DNS returns, resolved again when a connection drops
                                               (Kubernetes headless service, compose network alias of replicas)
make_channel(["10.0.0.5:50051", "10.0.0.6:50051"]) or "10.0.0.5:50051,10.0.0.6:50051"
                                               a static list, as gRPC's "ipv4:a:p,b:p" target
Every channel balances calls round_robin over the addresses it has (gRPC's own load balancing): each new call
(one stream) goes to the next ready server, and servers that are down are skipped. Keepalive pings find servers
that stopped answering (a frozen process): their connections close, and they are skipped too.
"""
from __future__ import annotations

import collections
import ipaddress
import socket
from collections.abc import Sequence

import grpc

LB_POLICY_OPTION = "grpc.lb_policy_name"
# A ping every 10 s, unanswered for 5 s, closes the connection: a frozen server's calls fail UNAVAILABLE, and
# round_robin stops picking it until it answers a new connection (servers accept the pings: quantd.server.app).
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
AUTHORIZATION_METADATA = "authorization"


def _split_host_port(target: str) -> tuple[str, str]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target {target!r} is not HOST:PORT")
    return host, port


def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _resolve(host: str, port: str) -> list[tuple[int, str]]:
    """(ip version, address) for every address of `host`, in resolver order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    found = [(4 if family == socket.AF_INET else 6, addr[0]) for family, _, _, _, addr in infos
             if family in (socket.AF_INET, socket.AF_INET6)]
    return list(dict.fromkeys(found))


_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _has_scheme(target: str) -> bool:
    """True for gRPC target URIs ("dns:///name:port", "ipv4:a:p,b:p", ...), False for HOST:PORT."""
    return ":/" in target or target.startswith(_SCHEMES)


def channel_target(targets: str | Sequence[str]) -> tuple[str, str | None]:
    """The gRPC target string for `targets`, and, for a list, the authority of its first entry (HOST:PORT as given):
    an address-list target has no authority of its own, and TLS verifies the server's certificate against it.

    One target is passed through unchanged. Several are turned into one static address list,
    "ipv4:a:p,b:p" (or "ipv6:[a]:p,..."): names in the list are resolved once, here; when names resolve to both
    IPv4 and IPv6 addresses only the IPv4 ones are kept (one gRPC target holds one family)."""
    if isinstance(targets, str):
        targets = [targets] if _has_scheme(targets) else targets.split(",")
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0], None
    for t in targets:
        if _has_scheme(t):
            raise ValueError(f"a list of targets takes HOST:PORT entries, got {t!r}; give a scheme target on its own")
    addresses: list[tuple[int, str, str]] = []
    for t in targets:
        host, port = _split_host_port(t)
        version = _ip_version(host)
        if version is None:
            addresses += [(v, a, port) for v, a in _resolve(host, port)]
        else:
            addresses.append((version, host, port))
    versions = {v for v, _, _ in addresses}
    keep = 4 if 4 in versions else 6
    entries = [f"{a}:{p}" if v == 4 else f"[{a}]:{p}" for v, a, p in dict.fromkeys(addresses) if v == keep]
    return f"ipv{keep}:{','.join(entries)}", targets[0]


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class BearerTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call (plaintext channels, where call credentials are refused)."""

    def __init__(self, token: str):
        self._header = (AUTHORIZATION_METADATA, f"Bearer {token}")

    def _details(self, details):
        metadata = [m for m in (details.metadata or ()) if m[0] != AUTHORIZATION_METADATA] + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def make_channel(targets: str | Sequence[str], *, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 token: str | None = None, options=()) -> grpc.Channel:
    """A grpc.Channel balancing calls round_robin over `targets` (see channel_target).

    TLS when root_certificates (PEM of the CA that signed the servers' certificates) is given; private_key and
    certificate_chain add a client certificate (mutual TLS). token adds "authorization: Bearer <token>" to every
    call: as call credentials over TLS, by a client interceptor on plaintext channels. `options` are extra channel
    options; they win over the ones set here."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both private_key and certificate_chain")
    if certificate_chain is not None and root_certificates is None:
        raise ValueError("a client certificate (mutual TLS) needs root_certificates as well")
    if token is not None and (not token or any(ch.isspace() for ch in token)):
        raise ValueError("token must be non-empty and contain no whitespace")
    target, authority = channel_target(targets)
    given = {name for name, _ in options}
    channel_options = [(LB_POLICY_OPTION, "round_robin"), *KEEPALIVE_OPTIONS]
    if authority is not None:
        channel_options.append(("grpc.default_authority", authority))
    channel_options = [o for o in channel_options if o[0] not in given] + list(options)

    if root_certificates is None:
        channel = grpc.insecure_channel(target, options=channel_options)
        return grpc.intercept_channel(channel, BearerTokenInterceptor(token)) if token else channel
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                               certificate_chain=certificate_chain)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=channel_options)
