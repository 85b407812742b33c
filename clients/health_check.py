"""`python -m pagedserve.clients.health_check HOST:PORT [--tls-ca-file PEM]`: exit 0 when the server's gRPC health
is SERVING. Health checks need no API key."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.runtime.flags import EPILOG, parse_args


def is_serving(address: str, timeout_s: float = 3.0, tls_root_certificates: bytes | None = None) -> bool:
    """Whether the server at address answers SERVING within timeout_s; over TLS trusting tls_root_certificates
    when they are given."""
    if tls_root_certificates is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_root_certificates))
    with channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods (set in __init__ at run time).
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pagedserve.clients.health_check",
                                description="Exit 0 when the server's gRPC health is SERVING, 1 otherwise.",
                                epilog=EPILOG)
    p.add_argument("address", metavar="HOST:PORT", help="the server's public address")
    p.add_argument("--tls-ca-file", type=Path, help="PEM CA certificates: check over TLS, trusting these")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, os.environ)
    roots = args.tls_ca_file.read_bytes() if args.tls_ca_file else None
    return 0 if is_serving(args.address, tls_root_certificates=roots) else 1


if __name__ == "__main__":
    sys.exit(main())
