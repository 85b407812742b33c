"""`python -m pagedserve.clients.health_check HOST:PORT`: exit 0 when the server's gRPC health is SERVING."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(address: str, timeout_s: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pagedserve.clients.health_check HOST:PORT", file=sys.stderr)
        return 2
    return 0 if is_serving(sys.argv[1]) else 1


if __name__ == "__main__":
    sys.exit(main())
