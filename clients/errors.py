"""Typed exceptions for the gRPC status codes the pagedserve API returns."""

from __future__ import annotations

import grpc


class PagedServeClientError(Exception):
    """Base of every error the client raises; `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PagedServeClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(PagedServeClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(PagedServeClientError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(PagedServeClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(PagedServeClientError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(PagedServeClientError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(PagedServeClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(PagedServeClientError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(PagedServeClientError):
    """A missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {cls.code: cls for cls in PagedServeClientError.__subclasses__()}

RETRYABLE = (Unavailable, ResourceExhausted)


def error_from_rpc(error: grpc.RpcError) -> PagedServeClientError:
    """The typed exception for a failed call (unknown codes map to the base class)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    exc = _BY_CODE.get(code, PagedServeClientError)(details or code.name)
    exc.code = code
    return exc
