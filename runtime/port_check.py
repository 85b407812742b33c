"""Refuses to listen on an address where something already listens.

gRPC binds its servers with SO_REUSEPORT, so a second server started on a port in use does not fail: the kernel
shares the port's new connections between the two, and each client reaches whichever it picked. `serve` (its
frontends share the public port on purpose) and `worker` check their port first, with a socket that does not
share.
"""

from __future__ import annotations

import socket


def check_port_free(address: str, flag: str) -> None:
    """ValueError naming flag and address unless a socket can bind address (HOST:PORT, an IPv6 host in brackets)
    alone; port 0 (any free port) passes."""
    host, _, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if int(port_text) == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections closing on it are no obstacle
        try:
            probe.bind((host, int(port_text)))
        except OSError as error:
            raise ValueError(f"{flag}: cannot listen on {address}: {error.strerror} (is another server running "
                             "there?)") from None
