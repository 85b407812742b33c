"""A port something already listens on is refused by name, since gRPC's own bind would share it silently."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest

from pagedserve.runtime.port_check import check_port_free


def test_a_port_in_use_is_refused_naming_the_flag_and_the_address(busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    with pytest.raises(ValueError, match=rf"^--port: cannot listen on {address}: Address already in use"):
        check_port_free(address, "--port")


def test_a_grpc_servers_port_is_refused_though_grpc_itself_would_share_it() -> None:
    servers = [grpc.server(futures.ThreadPoolExecutor(1)) for _ in range(2)]  # never started: only binds matter
    port = servers[0].add_insecure_port("127.0.0.1:0")
    try:
        assert servers[1].add_insecure_port(f"127.0.0.1:{port}") == port  # gRPC's second bind succeeds
        with pytest.raises(ValueError, match="--listen: cannot listen on"):
            check_port_free(f"127.0.0.1:{port}", "--listen")
    finally:
        for server in servers:
            server.stop(None)


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:0", "0.0.0.0:0"])
def test_any_free_port_passes(address: str) -> None:
    check_port_free(address, "--port")


def test_a_free_port_passes_and_stays_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        free = int(sock.getsockname()[1])
    check_port_free(f"127.0.0.1:{free}", "--port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.bind(("127.0.0.1", free))  # the check let go of it
