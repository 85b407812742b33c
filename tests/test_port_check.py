"""A port something already listens on is refused by name, since gRPC's own bind would share it silently; a port picked
for a process started next lies outside the ports the OS gives outgoing connections, which could take it first."""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pagedserve.runtime import port_check
from pagedserve.runtime.port_check import check_port_free, ephemeral_range, free_loopback_port, free_port


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


@pytest.mark.parametrize("pick", [free_loopback_port, lambda: free_port("0.0.0.0", "--host")],
                         ids=["loopback", "a frontends' shared port"])
def test_a_picked_port_is_outside_the_ephemeral_range_and_free(pick: Callable[[], int]) -> None:
    low, high = ephemeral_range()
    for _ in range(20):
        port = pick()
        assert not low <= port <= high
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_with_every_port_ephemeral_the_os_picks_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "range").write_text("1024\t65535\n")
    monkeypatch.setattr(port_check, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    assert ephemeral_range() == (1024, 65535)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", free_loopback_port()))


def test_an_unreadable_range_is_linuxs_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(port_check, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ephemeral_range() == port_check.DEFAULT_EPHEMERAL_RANGE
