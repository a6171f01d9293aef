"""TLS, mutual TLS and bearer tokens on a real grpc.aio server, with certificates made at run time."""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import subprocess
import sys
import time

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_harness import STREAM, UNARY, ServerThread, echo_server
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from quantd.client import QuantdClient, QuantdError
from quantd.client.channels import make_channel
from quantd.kernels import reference
from quantd.kernels.spec import QuantSpec
from quantd.server import security
from quantd.server.app import BackgroundServer
from quantd.server.config import ServerConfig
from quantd.server.healthcheck import check as health_check
from quantd.server.metrics import Metrics


# -- certificates -------------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer_key, issuer_name, *, ca=False, sans=(), usage=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key, cert, key_pem, cert.public_bytes(serialization.Encoding.PEM)


@dataclasses.dataclass
class Pki:
    ca_pem: bytes
    server_key: bytes
    server_cert: bytes
    client_key: bytes
    client_cert: bytes
    other_ca_pem: bytes        # a CA that signed nothing here: trusting it must fail
    rogue_client_key: bytes    # a client certificate from that other CA
    rogue_client_cert: bytes
    dir: object = None

    def file(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca_key, ca_cert, _, ca_pem = _issue("quantd test CA", None, None, ca=True)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _, _, server_key, server_cert = _issue("localhost", ca_key, ca_cert.subject, sans=sans,
                                           usage=ExtendedKeyUsageOID.SERVER_AUTH)
    _, _, client_key, client_cert = _issue("training-job", ca_key, ca_cert.subject,
                                           usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other_key, other_cert, _, other_pem = _issue("other CA", None, None, ca=True)
    _, _, rogue_key, rogue_cert = _issue("rogue-job", other_key, other_cert.subject,
                                         usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pki = Pki(ca_pem, server_key, server_cert, client_key, client_cert, other_pem, rogue_key, rogue_cert,
              tmp_path_factory.mktemp("pki"))
    for name in ("ca_pem", "server_key", "server_cert", "client_key", "client_cert"):
        (pki.dir / name).write_bytes(getattr(pki, name))
    (pki.dir / "tokens").write_bytes(b"\n  file-token-1  \n\nfile-token-2\n")
    return pki


def config(**fields) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, device="cpu", **fields)


@pytest.fixture
def serve():
    servers = []

    def start(cfg, metrics: Metrics | None = None) -> ServerThread:
        """The echo server with the credentials and interceptors `cfg` asks for, as the quantd server builds them."""
        interceptors = [metrics.interceptor()] if metrics else []
        auth = security.auth_interceptor(cfg)
        if auth is not None:
            interceptors.append(auth)
        server = echo_server(security.server_credentials(cfg), interceptors)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def unary(channel, payload=b"abc", timeout=10):
    return channel.unary_unary(UNARY)(payload, timeout=timeout)


def stream(channel, chunks, timeout=10):
    return list(channel.stream_stream(STREAM)(iter(chunks), timeout=timeout))


def health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def reflected_services(channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=10)
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# -- configuration ------------------------------------------------------------------------------------------------
def test_everything_is_off_by_default():
    assert security.server_credentials(config()) is None
    assert security.auth_interceptor(config()) is None


def test_bad_tls_configuration_is_named(pki, tmp_path):
    with pytest.raises(ValueError, match="tls_key_file"):
        security.server_credentials(config(tls_cert_file=pki.file("server_cert")))
    with pytest.raises(ValueError, match="tls_client_ca_file"):
        security.server_credentials(config(tls_client_ca_file=pki.file("ca_pem")))
    with pytest.raises(ValueError, match="cannot read TLS certificate file"):
        security.server_credentials(config(tls_cert_file=str(tmp_path / "missing.pem"),
                                           tls_key_file=pki.file("server_key")))
    (tmp_path / "empty.pem").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        security.server_credentials(config(tls_cert_file=str(tmp_path / "empty.pem"),
                                           tls_key_file=pki.file("server_key")))


def test_tokens_from_config_and_file(pki):
    cfg = config(auth_tokens=("alpha", " beta ", "alpha"), auth_tokens_file=pki.file("tokens"))
    assert security.load_tokens(cfg) == ("alpha", "beta", "file-token-1", "file-token-2")
    with pytest.raises(ValueError, match="whitespace"):
        security.load_tokens(config(auth_tokens=("two words",)))


def test_token_comparison():
    check = security.BearerTokenInterceptor(["s3cret", "other-token"])
    assert check.authorized((("authorization", "Bearer s3cret"),))
    assert check.authorized((("x-request-id", "1"), ("authorization", "bearer other-token")))
    for metadata in ((), (("authorization", "Bearer s3cre"),), (("authorization", "Bearer s3cret2"),),
                     (("authorization", "s3cret"),), (("authorization", "Basic s3cret"),),
                     (("authorization", "Bearer "),), (("x-token", "Bearer s3cret"),)):
        assert not check.authorized(metadata), metadata


# -- tokens on a plaintext server -----------------------------------------------------------------------------------
def test_token_right_wrong_missing(serve):
    server = serve(config(auth_tokens=("s3cret",)))
    with make_channel(server.target, token="s3cret") as channel:
        assert unary(channel, b"hello") == b"olleh"
        assert stream(channel, [b"ab", b"cd", b"ef"]) == [b"ba", b"dc", b"fe"]
    for token in (None, "wrong"):
        with make_channel(server.target, token=token) as channel:
            err = rpc_error(unary, channel)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "bearer token" in err.details()
            err = rpc_error(stream, channel, [b"x" * 1024] * 3)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, token
            # health and reflection stay open without a token
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert "quantd.test.Echo" in reflected_services(channel)


def test_tokens_file_and_several_tokens(serve, pki):
    server = serve(config(auth_tokens=("one",), auth_tokens_file=pki.file("tokens")))
    for token in ("one", "file-token-1", "file-token-2"):
        with make_channel(server.target, token=token) as channel:
            assert unary(channel) == b"cba"
    with make_channel(server.target, token="file-token-3") as channel:
        assert rpc_error(unary, channel).code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_tokens_calls_are_open(serve):
    server = serve(config())
    with make_channel(server.target) as channel:
        assert unary(channel) == b"cba"


# -- TLS ------------------------------------------------------------------------------------------------------------
def tls_config(pki, **fields):
    return config(tls_cert_file=pki.file("server_cert"), tls_key_file=pki.file("server_key"), **fields)


def test_tls(serve, pki):
    server = serve(tls_config(pki))
    for target in (server.target, f"localhost:{server.port}"):
        with make_channel(target, root_certificates=pki.ca_pem) as channel:
            assert unary(channel, b"tls") == b"slt"
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    # a client that trusts another CA refuses the server; a plaintext client gets no answer
    with make_channel(server.target, root_certificates=pki.other_ca_pem) as channel:
        assert rpc_error(unary, channel, timeout=5).code() == grpc.StatusCode.UNAVAILABLE
    with make_channel(server.target) as channel:
        assert rpc_error(unary, channel, timeout=5).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(serve, pki):
    server = serve(tls_config(pki, tls_client_ca_file=pki.file("ca_pem")))
    with make_channel(server.target, root_certificates=pki.ca_pem, private_key=pki.client_key,
                      certificate_chain=pki.client_cert) as channel:
        assert unary(channel, b"mtls") == b"sltm"
    # without a client certificate, or with one from a CA the server does not trust: the handshake fails,
    # so not even the health service answers
    for key, cert in ((None, None), (pki.rogue_client_key, pki.rogue_client_cert)):
        with make_channel(server.target, root_certificates=pki.ca_pem, private_key=key,
                          certificate_chain=cert) as channel:
            assert rpc_error(unary, channel, timeout=5).code() == grpc.StatusCode.UNAVAILABLE
            assert rpc_error(health, channel).code() == grpc.StatusCode.UNAVAILABLE


def test_tls_with_token_and_metrics(serve, pki):
    metrics = Metrics()
    server = serve(tls_config(pki, auth_tokens=("s3cret",)), metrics)
    with make_channel(server.target, root_certificates=pki.ca_pem, token="s3cret") as channel:
        assert stream(channel, [b"12", b"34"]) == [b"21", b"43"]
    for token in (None, "wrong"):
        with make_channel(server.target, root_certificates=pki.ca_pem, token=token) as channel:
            assert rpc_error(stream, channel, [b"12"]).code() == grpc.StatusCode.UNAUTHENTICATED
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    count = metrics.registry.get_sample_value
    labels = {"service": "quantd.test.Echo", "rpc": "Stream"}
    assert count("quantd_requests_total", {**labels, "code": "OK"}) == 1
    # an abort reaches the client a moment before the server's interceptor counts it
    deadline = time.monotonic() + 30
    while count("quantd_requests_total", {**labels, "code": "UNAUTHENTICATED"}) != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count("quantd_requests_total", {**labels, "code": "UNAUTHENTICATED"}) == 2
    assert count("quantd_requests_total", {"service": "grpc.health.v1.Health", "rpc": "Check", "code": "OK"}) == 2


def test_round_robin_channel_over_tls(serve, pki):
    metrics = [Metrics(), Metrics()]
    servers = [serve(tls_config(pki, auth_tokens=("s3cret",)), m) for m in metrics]
    targets = [s.target for s in servers]
    labels = {"service": "quantd.test.Echo", "rpc": "Unary", "code": "OK"}

    def counts():
        return [m.registry.get_sample_value("quantd_requests_total", labels) or 0.0 for m in metrics]

    # round_robin alternates between ready servers; the first calls may find only one connected yet (a TLS handshake
    # on a loaded machine), so calls go on until each server has answered two, within a bound
    calls = 0
    with make_channel(targets, root_certificates=pki.ca_pem, token="s3cret") as channel:
        while calls < 6 or (min(counts()) < 2 and calls < 200):
            assert unary(channel, b"%d" % calls) == (b"%d" % calls)[::-1]  # the echo reverses
            calls += 1
    assert sum(counts()) == calls and min(counts()) >= 2, (calls, counts())
    # names in a list are resolved, and TLS still verifies the name
    with make_channel([f"localhost:{s.port}" for s in servers], root_certificates=pki.ca_pem,
                      token="s3cret") as channel:
        assert unary(channel, b"xy") == b"yx"


# -- the container health probe -------------------------------------------------------------------------------------
def test_healthcheck_probe(serve, pki):
    server = serve(tls_config(pki, tls_client_ca_file=pki.file("ca_pem"), auth_tokens=("s3cret",)))
    assert health_check(server.target, root_certificates=pki.ca_pem, private_key=pki.client_key,
                        certificate_chain=pki.client_cert) == "SERVING"
    env = {**os.environ, "QUANTD_PORT": str(server.port), "QUANTD_HEALTHCHECK_CA_FILE": pki.file("ca_pem"),
           "QUANTD_HEALTHCHECK_CERT_FILE": pki.file("client_cert"),
           "QUANTD_HEALTHCHECK_KEY_FILE": pki.file("client_key")}
    probe = [sys.executable, "-m", "quantd.server.healthcheck", "--timeout", "5"]
    ok = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    del env["QUANTD_HEALTHCHECK_CERT_FILE"], env["QUANTD_HEALTHCHECK_KEY_FILE"]
    refused = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout, refused.stdout + refused.stderr


# -- the quantd server itself, configured through ServerConfig, with the real client ----------------------------------
@pytest.fixture
def quantd():
    servers = []

    def start(cfg: ServerConfig) -> BackgroundServer:
        server = BackgroundServer(cfg)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_quantd_server_with_tls_and_tokens(quantd, pki, rng):
    server = quantd(tls_config(pki, auth_tokens=("s3cret", "second")))
    x = torch.randn(32, 256, generator=rng).to(torch.bfloat16)
    spec = QuantSpec("fp8_e4m3", group_size=128)
    with QuantdClient(server.target, token="second", root_certificates=pki.ca_pem, timeout=120) as client:
        qt = client.quantize(x, spec)
        assert client.server_info()["version"]
    expected = reference.quantize(x, spec)
    assert torch.equal(qt.codes.view(torch.uint8), expected.codes.view(torch.uint8))
    assert torch.equal(qt.scales, expected.scales)
    for token in (None, "wrong"):
        with QuantdClient(server.target, token=token, root_certificates=pki.ca_pem, retries=0) as client:
            for call in (client.server_info, lambda: client.quantize(x, spec)):
                with pytest.raises(QuantdError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, token
    # the probe needs TLS but no token
    assert health_check(server.target, root_certificates=pki.ca_pem) == "SERVING"


def test_quantd_server_with_mutual_tls(quantd, pki):
    server = quantd(tls_config(pki, tls_client_ca_file=pki.file("ca_pem")))
    with QuantdClient(server.target, root_certificates=pki.ca_pem, private_key=pki.client_key,
                      certificate_chain=pki.client_cert) as client:
        assert client.server_info()["version"]
    for key, cert in ((None, None), (pki.rogue_client_key, pki.rogue_client_cert)):
        with QuantdClient(server.target, root_certificates=pki.ca_pem, private_key=key, certificate_chain=cert,
                          retries=0, timeout=10) as client:
            with pytest.raises(QuantdError) as err:
                client.server_info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_quantd_server_is_open_by_default(quantd):
    server = quantd(config())
    with QuantdClient(server.target) as client:
        assert client.server_info()["version"]
