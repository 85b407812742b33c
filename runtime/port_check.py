"""Refuses to listen on an address where something already listens, and picks a free port to share.

gRPC binds its servers with SO_REUSEPORT, so a second server started on a port in use does not fail: the kernel
shares the port's new connections between the two, and each client reaches whichever it picked. `serve` (its
frontends share the public port on purpose) and `worker` check their port first, with a socket that does not
share; `serve` with several frontends and port 0 picks the one port they share here. A port for a process about to
be started (the frontends' shared port, a local worker's, a test's server's) is picked outside the range of ports
the OS hands to outgoing connections.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Linux's range of ephemeral ports, and its default when it cannot be read.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)
_PICKS = 64  # random ports tried outside the ephemeral range before the OS's own pick


def check_port_free(address: str, flag: str) -> None:
    """ValueError naming flag and address unless a socket can bind address (HOST:PORT, an IPv6 host in brackets)
    alone; port 0 (any free port) passes."""
    host, _, port_text = address.rpartition(":")
    if int(port_text) != 0:
        _bind_alone(host, int(port_text), f"{flag}: cannot listen on {address}", " (is another server running there?)")


def free_port(host: str, flag: str) -> int:
    """A port of host (an IPv6 host in brackets or not) that was free a moment ago, for another process to bind
    soon: picked at random outside the OS's ephemeral range where one is free, since ports in that range are also
    given to outgoing connections, and one of those could take the port between this pick and that bind; the OS's
    own pick when none is free there. ValueError naming flag when host cannot be bound."""
    low, high = ephemeral_range()
    spans = [(first, last) for first, last in ((1024, low - 1), (high + 1, 65535)) if first <= last]
    weights = [last - first + 1 for first, last in spans]
    for _ in range(_PICKS if spans else 0):
        first, last = random.choices(spans, weights)[0]
        try:
            return _bind_alone(host, random.randint(first, last), "")
        except ValueError:
            continue
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


def free_loopback_port() -> int:
    """free_port of 127.0.0.1: a local worker's, a test's or a benchmark's server's."""
    return free_port("127.0.0.1", "127.0.0.1")


def ephemeral_range() -> tuple[int, int]:
    """The OS's range of ports for outgoing connections (first, last): Linux's setting, else its default."""
    try:
        first, last = (int(value) for value in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return first, last
