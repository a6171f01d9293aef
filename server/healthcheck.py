"""Container health probe: asks a quantd server's grpc.health.v1 service whether it is SERVING.

    python -m quantd.server.healthcheck [HOST:PORT] [--service NAME] [--timeout S]
                                        [--ca-file PEM [--cert-file PEM --key-file PEM] [--server-name NAME]]

Exit status 0 when SERVING, 1 otherwise (NOT_SERVING while draining, unreachable, timeout), with one line on stdout.
Defaults come from the environment so the Dockerfile's HEALTHCHECK needs no arguments: the target is
127.0.0.1:$QUANTD_PORT (50051), TLS files from QUANTD_HEALTHCHECK_CA_FILE / _CERT_FILE / _KEY_FILE and the name to
verify from QUANTD_HEALTHCHECK_SERVER_NAME. The health service needs no token.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Only grpc here: the probe runs every few seconds and must not pay for importing torch (as quantd.client does).
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, *, service: str = "", timeout: float = 5.0, root_certificates: bytes | None = None,
          private_key: bytes | None = None, certificate_chain: bytes | None = None,
          server_name: str | None = None) -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...) the server reports for `service` ("" = the server).
    Raises grpc.RpcError when the server cannot be reached or answers with an error."""
    if root_certificates is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m quantd.server.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", default=f"127.0.0.1:{env.get('QUANTD_PORT') or 50051}",
                        help="HOST:PORT of the server (default 127.0.0.1:$QUANTD_PORT, else 50051)")
    parser.add_argument("--service", default="", help="health service name to ask about (default: the server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    parser.add_argument("--ca-file", default=env.get("QUANTD_HEALTHCHECK_CA_FILE"),
                        help="PEM CA to verify the server's TLS certificate; TLS is used when given")
    parser.add_argument("--cert-file", default=env.get("QUANTD_HEALTHCHECK_CERT_FILE"),
                        help="PEM client certificate, when the server requires mutual TLS")
    parser.add_argument("--key-file", default=env.get("QUANTD_HEALTHCHECK_KEY_FILE"),
                        help="PEM key of the client certificate")
    parser.add_argument("--server-name", default=env.get("QUANTD_HEALTHCHECK_SERVER_NAME"),
                        help="host name to verify in the server's certificate (default: the target's host)")
    args = parser.parse_args(argv)
    try:
        status = check(args.target, service=args.service, timeout=args.timeout,
                       root_certificates=_read(args.ca_file), private_key=_read(args.key_file),
                       certificate_chain=_read(args.cert_file), server_name=args.server_name)
    except grpc.RpcError as exc:
        print(f"{args.target}: {exc.code().name}: {exc.details()}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"{args.target}: {exc}")
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
