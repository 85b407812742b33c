"""Domain errors of the control plane; service.py maps each to one gRPC status code."""

from __future__ import annotations

from pagedserve.contract.errors import InvalidArgumentError, PagedServeError

__all__ = [
    "EngineUnavailableError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PagedServeError",
    "ResourceExhaustedError",
    "WorkerUnavailableError",
]


class ResourceExhaustedError(PagedServeError):
    """The admission queue is full, or a prompt can never fit in the KV pool (RESOURCE_EXHAUSTED)."""


class FailedPreconditionError(PagedServeError):
    """The server is not set up for the call, such as a chat with a model that has no chat template
    (FAILED_PRECONDITION)."""


class NotFoundError(PagedServeError):
    """An unknown request id (NOT_FOUND)."""


class WorkerUnavailableError(PagedServeError):
    """A worker is draining, unreachable or failed (UNAVAILABLE)."""


class EngineUnavailableError(PagedServeError):
    """The frontend lost its engine process (UNAVAILABLE)."""
