"""Domain errors of the control plane; service.py maps each to one gRPC status code."""

from __future__ import annotations

from pagedserve.contract.errors import InvalidArgumentError, PagedServeError

__all__ = [
    "AlreadyExistsError",
    "EngineUnavailableError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NeverFitsError",
    "NotFoundError",
    "PagedServeError",
    "ResourceExhaustedError",
    "WorkerUnavailableError",
]


class ResourceExhaustedError(PagedServeError):
    """The admission queue is full: retry later (RESOURCE_EXHAUSTED)."""


class NeverFitsError(ResourceExhaustedError):
    """The request can never run: it needs more KV blocks than any worker's pool holds. RESOURCE_EXHAUSTED, sent
    with the trailer `grpc-retry-pushback-ms: -1`, gRPC's standard word for "do not retry" (our client and gRPC's
    own retry policies honour it): unlike a full queue, waiting does not help."""


class AlreadyExistsError(PagedServeError):
    """A request id already in use by a request that has not ended (ALREADY_EXISTS)."""


class FailedPreconditionError(PagedServeError):
    """The server is not set up for the call, such as a chat with a model that has no chat template
    (FAILED_PRECONDITION)."""


class NotFoundError(PagedServeError):
    """An unknown request id (NOT_FOUND)."""


class WorkerUnavailableError(PagedServeError):
    """A worker is draining, unreachable or failed (UNAVAILABLE)."""


class EngineUnavailableError(PagedServeError):
    """The frontend lost its engine process (UNAVAILABLE)."""
