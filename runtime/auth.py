"""The cluster secret that the internal services (worker, engine) require of every caller, and its gRPC plumbing.

A caller sends `authorization: Bearer <secret>` in the metadata of every call; the server's interceptor compares it
in constant time and answers UNAUTHENTICATED, before the method runs, when it is missing or wrong. Health probes
(`grpc.health.v1.Health`) stay open so that load balancers and `docker compose` need no secret.
"""

from __future__ import annotations

import hmac
import secrets
import string
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
_SCHEME = "Bearer "
# The environment variable a process may be given its secret in (read only by main.py files).
SECRET_ENV = "PAGEDSERVE_CLUSTER_SECRET"
MIN_SECRET_LENGTH = 16
_ALLOWED = frozenset(string.ascii_letters + string.digits + string.punctuation)
_OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"
_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")


@dataclass(frozen=True, slots=True)
class ClusterSecret:
    """A shared secret of at least MIN_SECRET_LENGTH printable ASCII characters (no spaces: it travels in a
    header). Its repr hides the value, so a logged config never leaks it."""

    value: str = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_LENGTH:
            raise ValueError(f"cluster secret must have at least {MIN_SECRET_LENGTH} characters, got {len(self.value)}"
                             " (make one with `openssl rand -hex 32`)")
        if not set(self.value) <= _ALLOWED:
            raise ValueError("cluster secret must be printable ASCII without spaces")

    @classmethod
    def generate(cls) -> ClusterSecret:
        """A fresh random secret (256 bits)."""
        return cls(secrets.token_urlsafe(32))

    @classmethod
    def from_file(cls, path: Path) -> ClusterSecret:
        """The file's content without surrounding whitespace (a trailing newline is usual)."""
        return cls(path.read_text(encoding="ascii").strip())

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries it."""
        return ((METADATA_KEY, _SCHEME + self.value),)

    def matches(self, header: str | bytes) -> bool:
        """Whether an `authorization` header value carries this secret, compared in constant time."""
        received = header.encode("ascii", "replace") if isinstance(header, str) else header
        return hmac.compare_digest(received, (_SCHEME + self.value).encode("ascii"))


def cluster_secret_from(secret_file: Path | None, secret_value: str | None) -> ClusterSecret | None:
    """The secret from a file (--cluster-secret-file) or a value (PAGEDSERVE_CLUSTER_SECRET), None when neither is
    given; ValueError when both are (which one was meant is unclear) or the secret is too weak; OSError when the
    file cannot be read."""
    if secret_file is not None and secret_value:
        raise ValueError(f"the cluster secret is given twice: --cluster-secret-file and {SECRET_ENV}; give one")
    if secret_file is not None:
        return ClusterSecret.from_file(secret_file)
    return ClusterSecret(secret_value) if secret_value else None


def inherited_cluster_secret(environ: Mapping[str, str]) -> ClusterSecret | None:
    """The secret a parent process handed down in SECRET_ENV, or None when it gave none."""
    value = environ.get(SECRET_ENV)
    return ClusterSecret(value) if value else None


class ClusterSecretInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call reach its method only when its metadata carries the secret; health checks always pass.

    A refused call never runs its method (so it changes nothing) and never reads its request stream: it ends with
    UNAUTHENTICATED and a message saying what to send.
    """

    def __init__(self, secret: ClusterSecret) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_TRequest, _TResponse] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_SERVICE_PREFIX):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        headers = [value for key, value in metadata if key == METADATA_KEY]
        if any(self._secret.matches(header) for header in headers):
            return handler
        reason = "wrong cluster secret" if headers else "missing cluster secret"
        return refusal_handler(handler, f"{reason}: internal pagedserve services need metadata "
                                 f"'{METADATA_KEY}: Bearer <secret>' (--cluster-secret-file or {SECRET_ENV})")


def refusal_handler(
    handler: grpc.RpcMethodHandler[_TRequest, _TResponse], message: str,
) -> grpc.RpcMethodHandler[_TRequest, _TResponse]:
    """A handler of the same kind as handler that ends the call with UNAUTHENTICATED, reading nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Requests stay undecoded bytes: a refused caller costs no parsing.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, None, handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, None, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, None, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, handler.response_serializer)


class _CallMetadata:
    """Adds the secret's metadata to the calls it intercepts."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._metadata = secret.metadata

    def _with_secret(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# One class per kind of call: a channel files each interceptor under the first kind it is an instance of.
class _UnaryUnaryMetadata(_CallMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_secret(details), request)


class _UnaryStreamMetadata(_CallMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_secret(details), request)


class _StreamUnaryMetadata(_CallMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_secret(details), request_iterator)


class _StreamStreamMetadata(_CallMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_secret(details), request_iterator)


def client_interceptors(secret: ClusterSecret | None) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that make a channel send secret on every call (none when secret is None)."""
    if secret is None:
        return []
    kinds = (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata, _StreamStreamMetadata)
    return [kind(secret) for kind in kinds]
