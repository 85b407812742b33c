"""The frozen configuration of a worker's place in its tensor-parallel group."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorParallelConfig:
    """Where this rank sits in its group: rank in [0, size); the leader (rank 0) hosts the rendezvous store at
    rendezvous (HOST:PORT); a collective that waits longer than timeout_s fails, which ends the rank."""

    rank: int = 0
    size: int = 1
    rendezvous: str | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tp_size must be at least 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank must be in [0, {self.size}), got {self.rank}")
        if self.size > 1:
            host, sep, port = (self.rendezvous or "").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError(f"tp_rendezvous must be HOST:PORT with tp_size {self.size}, got {self.rendezvous!r}")
        if not self.timeout_s > 0:  # also rejects NaN
            raise ValueError(f"tp_timeout_s must be positive, got {self.timeout_s}")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0
