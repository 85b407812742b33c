"""Refuses to listen on an address where something already listens, and picks a free port to share.

gRPC binds its servers with SO_REUSEPORT, so a second server started on a port in use does not fail: the kernel
shares the port's new connections between the two, and each client reaches whichever it picked. `serve` (its
frontends share the public port on purpose) and `worker` check their port first, with a socket that does not
share; `serve` with several frontends and port 0 picks the one port they share here.
"""

from __future__ import annotations

import socket


def check_port_free(address: str, flag: str) -> None:
    """ValueError naming flag and address unless a socket can bind address (HOST:PORT, an IPv6 host in brackets)
    alone; port 0 (any free port) passes."""
    host, _, port_text = address.rpartition(":")
    if int(port_text) != 0:
        _bind_alone(host, int(port_text), f"{flag}: cannot listen on {address}", " (is another server running there?)")


def free_port(host: str, flag: str) -> int:
    """A port of host (an IPv6 host in brackets or not) that was free a moment ago, the OS's pick; ValueError naming
    flag when host cannot be bound."""
    return _bind_alone(host, 0, f"{flag}: cannot listen on {host}")


def _bind_alone(host: str, port: int, failure: str, hint: str = "") -> int:
    """Binds a socket that shares nothing to (host, port) and lets it go; the port it got."""
    host = host.removeprefix("[").removesuffix("]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closing on it are no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"{failure}: {error.strerror}{hint}") from None
        return int(probe.getsockname()[1])
