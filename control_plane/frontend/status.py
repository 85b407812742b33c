"""Domain errors as gRPC statuses for the public port's services (GenerationService and vLLM's engine protocol):
one table (STYLE.md section 9), strict request decoding, and the abort that carries a status to the client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from google.protobuf.message import Message

from pagedserve.control_plane.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    InvalidArgumentError,
    NeverFitsError,
    NotFoundError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.frontend.convert import decode_request
from pagedserve.control_plane.scheduling.kv_events import ReplayExpiredError, SubscriberBehindError

log = structlog.get_logger()

M = TypeVar("M", bound=Message)

_STATUS_OF_ERROR: tuple[tuple[type[PagedServeError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (WorkerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ReplayExpiredError, grpc.StatusCode.OUT_OF_RANGE),
    (SubscriberBehindError, grpc.StatusCode.DATA_LOSS),
)
# gRPC's standard trailer that tells a client (ours, or gRPC's own retry policy) not to retry: a negative value.
_DO_NOT_RETRY = (("grpc-retry-pushback-ms", "-1"),)


class Abort(Exception):
    """A status (code, message, trailers) on its way out of a servicer method."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple[tuple[str, str], ...] = ()
                 ) -> None:
        super().__init__(message)
        self.code = code
        self.trailing_metadata = trailing_metadata

    async def send(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """Ends the call with this status."""
        await context.abort(self.code, str(self), self.trailing_metadata)


@contextmanager
def status_of_errors() -> Iterator[None]:
    """Turns a domain error into the Abort of the status code STYLE.md section 9 assigns it (a request that can never
    fit also says not to retry); anything else is INTERNAL, logged with its traceback."""
    try:
        yield
    except PagedServeError as exc:
        code = next((c for kind, c in _STATUS_OF_ERROR if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
        raise Abort(code, str(exc), _DO_NOT_RETRY if isinstance(exc, NeverFitsError) else ()) from exc
    except Exception as exc:
        log.exception("internal_error")
        raise Abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}") from exc


def strict_decoder(message_type: type[M]) -> Callable[[bytes], M | InvalidArgumentError]:
    """A request deserializer that never raises (gRPC would answer UNKNOWN): bytes that decode_request refuses
    (malformed, or a field this server does not know) become its InvalidArgumentError, which the servicer's method
    answers with INVALID_ARGUMENT through decoded()."""

    def decode(data: bytes) -> M | InvalidArgumentError:
        try:
            return decode_request(message_type, data)
        except InvalidArgumentError as exc:
            return exc

    return decode


def decoded(request: M | InvalidArgumentError) -> M:
    """The request a strict decoder produced; raises the error it produced instead of a message."""
    if isinstance(request, InvalidArgumentError):
        raise request
    return request
