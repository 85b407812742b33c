"""Where the ranks of a group meet: the leader's rendezvous store, and gloo groups, on the rendezvous host only.

torch's TCPStore listens on every interface of the host when left to itself, and gloo on the address the host name
resolves to; neither authenticates its peers. A group's ranks share one host, so both are bound to the rendezvous
host instead (127.0.0.1 for the groups `serve` starts): the leader opens the store's listening socket itself and
hands it over, and each gloo group's device is made for that host.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import cast

import torch._C._distributed_c10d as c10d

from pagedserve.gpu_worker.parallel.config import TensorParallelConfig

# How long a rank waits for the others to reach the rendezvous and, after loading, for the slowest to finish
# loading its weights: the worker start timeout of `serve`.
RENDEZVOUS_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """The store every rank reaches; listener is the leader's listening socket (kept open as long as the store)."""

    host: str
    store: c10d.Store
    listener: socket.socket | None


def meet(config: TensorParallelConfig) -> Rendezvous:
    """Hosts (leader) or reaches (follower) the store at config.rendezvous; RuntimeError or OSError when that fails
    (the port is taken, or the leader does not come within RENDEZVOUS_TIMEOUT_S)."""
    host, _, port = (config.rendezvous or "").rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if not config.is_leader:
        return Rendezvous(host, c10d.TCPStore(host, int(port), config.size, False, timeout), None)
    family, kind, protocol, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, protocol)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(128)
    store = c10d.TCPStore(host, int(port), config.size, True, timeout, master_listen_fd=listener.fileno())
    return Rendezvous(host, store, listener)


def gloo_group(rendezvous: Rendezvous, prefix: str, config: TensorParallelConfig,
               timeout: datetime.timedelta) -> c10d.ProcessGroupGloo:
    """A gloo group of the ranks over the store (its keys under prefix), connected on the rendezvous host."""
    # The runtime's options class is _Options (with _devices, _timeout); torch's stubs describe another, Options.
    options = c10d.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._devices = [c10d.ProcessGroupGloo.create_device(hostname=rendezvous.host)]
    options._timeout = timeout
    store = cast(c10d.Store, c10d.PrefixStore(prefix, rendezvous.store))
    return c10d.ProcessGroupGloo(store, config.rank, config.size, options)
