"""Domain errors of the control plane; service.py maps each to one gRPC status code."""

from __future__ import annotations


class PagedServeError(Exception):
    """Base of every error the control plane reports to a client."""


class InvalidArgumentError(PagedServeError, ValueError):
    """A prompt or sampling parameter is out of range (INVALID_ARGUMENT). The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhaustedError(PagedServeError):
    """The admission queue is full, or a prompt can never fit in the KV pool (RESOURCE_EXHAUSTED)."""


class NotFoundError(PagedServeError):
    """An unknown request id (NOT_FOUND)."""


class WorkerUnavailableError(PagedServeError):
    """A worker is draining, unreachable or failed (UNAVAILABLE)."""


class EngineUnavailableError(PagedServeError):
    """The frontend lost its engine process (UNAVAILABLE)."""
