"""WorkerService over grpc.aio, plus health and (optional) reflection; maps worker errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.contract import codec
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.gpu_worker.errors import (
    CacheNotInitializedError,
    InvalidCacheRequestError,
    InvalidStepError,
    WorkerError,
)
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.step_pipeline import LaunchStream, StepNotLaunchedError, StepPipeline
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import ClusterSecret, ClusterSecretInterceptor
from pagedserve.runtime.channel_options import INTERNAL_CHANNEL_OPTIONS
from pagedserve.runtime.reflection import add_reflection
from pagedserve.v1 import worker_service_pb2, worker_service_pb2_grpc

log = structlog.get_logger()
T = TypeVar("T")

_STATUS_CODES: dict[type[WorkerError], grpc.StatusCode] = {
    CacheNotInitializedError: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidStepError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidCacheRequestError: grpc.StatusCode.INVALID_ARGUMENT,
}
_SERVICE_NAME = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
_OWNED = "another control plane owns this worker: its Execute stream is open (one control plane at a time)"
# The server pings its callers every 20 s, idle streams included, and drops a connection whose peer does not answer
# within 10 s: an owner cut off by the network (no reset ever arrives) loses its stream, and the worker its state,
# rather than holding the worker forever.
_SERVER_OPTIONS = (
    *INTERNAL_CHANNEL_OPTIONS,
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class _StreamEnd(enum.Enum):
    """How the owner's Execute stream ended, which decides what the worker keeps.

    There is no "closed, state kept": grpc.aio ends the request stream of a call its client cancelled (or whose
    connection died) exactly as it ends a half-closed one, and the cancellation itself reaches the handler only if
    it is still running then. A worker that kept its state when the requests ran out would keep, now and then, the
    sequences and blocks of a control plane that is gone.
    """

    REJECTED = "rejected"  # a step was refused before it changed anything (INVALID_ARGUMENT, ...): state kept
    LOST = "lost"  # the requests ended (cancel, peer gone, half-close) or a step failed inside the worker: all dropped


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """Thin adapter: converts messages, runs worker calls through a StepPipeline, maps errors to codes.

    The pipeline keeps the event loop free and makes device work happen on one thread, in the order requests
    arrive; on the Execute stream, step N+1 is launched as soon as it arrives, while step N is still running.

    Ownership: one control plane drives the worker at a time. While an Execute stream is open, another Execute and
    any InitCache get FAILED_PRECONDITION and change nothing. When that stream ends, however it ends but by a refused
    step (see _StreamEnd), the worker drops its KV cache and every sequence, so the next control plane must call
    InitCache before Execute.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._pipeline = StepPipeline(worker)
        self._is_owned = False  # an Execute stream is open

    def close(self) -> None:
        self._pipeline.close()

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as error:  # noqa: BLE001 - every failure becomes a status
            await self._fail(context, error)

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
        if isinstance(error, InvalidArgumentError):
            error = InvalidStepError(str(error))
        if isinstance(error, WorkerError):
            code = _STATUS_CODES.get(type(error), grpc.StatusCode.INTERNAL)
            log.warning("worker_request_rejected", code=code.name, reason=str(error))
            await context.abort(code, str(error))
        log.error("worker_call_failed", exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal worker error")
        raise AssertionError("context.abort always raises")

    async def GetWorkerInfo(
        self,
        request: worker_service_pb2.GetWorkerInfoRequest,
        context: grpc.aio.ServicerContext[
            worker_service_pb2.GetWorkerInfoRequest, worker_service_pb2.GetWorkerInfoResponse
        ],
    ) -> worker_service_pb2.GetWorkerInfoResponse:
        return codec.worker_info_to_proto(self._worker.info())

    async def InitCache(
        self,
        request: worker_service_pb2.InitCacheRequest,
        context: grpc.aio.ServicerContext[worker_service_pb2.InitCacheRequest, worker_service_pb2.InitCacheResponse],
    ) -> worker_service_pb2.InitCacheResponse:
        if self._is_owned:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"InitCache refused: {_OWNED}")
        try:
            cache_request = codec.cache_request_from_proto(request)
        except InvalidArgumentError as error:
            await self._fail(context, InvalidCacheRequestError(str(error)))
        info = await self._call(context, self._pipeline.call(lambda: self._worker.init_cache(cache_request)))
        return codec.cache_info_to_proto(info)

    async def Execute(
        self,
        request_iterator: AsyncIterator[worker_service_pb2.ExecuteRequest],
        context: grpc.aio.ServicerContext[worker_service_pb2.ExecuteRequest, worker_service_pb2.ExecuteResponse],
    ) -> None:
        """Replies through context.write, not as an async generator: grpc.aio cancels the task that drives a
        generator, so a cancel that lands while a reply is being written leaves the generator suspended at its
        yield, its finally (the cache's release) deferred until it is garbage collected. Here it lands inside."""
        if self._is_owned:  # checked and set with no await between: two streams cannot both pass
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"Execute refused: {_OWNED}")
        if not self._worker.is_cache_initialized:  # at once, rather than at the first step (checked again there)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "InitCache must run before Execute")
        self._is_owned = True
        launched: asyncio.Queue[asyncio.Future[LaunchedStep] | BaseException | None] = asyncio.Queue()
        stream = LaunchStream()
        launcher = asyncio.create_task(self._launch_each(request_iterator, launched, stream))
        released = False
        try:
            while (item := await launched.get()) is not None:
                try:
                    if isinstance(item, BaseException):
                        raise item
                    result = await self._pipeline.finish(await item)
                except Exception as error:  # noqa: BLE001 - every failure becomes a status
                    # Released before the status goes out: its caller may open the next stream as soon as it reads it.
                    released = True
                    launcher.cancel()
                    self._release(_StreamEnd.REJECTED if _is_rejection(error) else _StreamEnd.LOST)
                    await self._fail(context, error)
                log.debug("step_executed", step=result.step_id, num_outputs=len(result.outputs),
                          step_time_ms=result.step_time_ms)
                await context.write(codec.step_result_to_proto(result))
        finally:
            launcher.cancel()  # it is waiting for the next request: it queues nothing more
            stream.end()
            while not launched.empty():
                if isinstance(item := launched.get_nowait(), asyncio.Future):
                    item.add_done_callback(_log_unreplied_failure)
            if not released:
                self._release(_StreamEnd.LOST)

    def _release(self, end: _StreamEnd) -> None:
        """Ends the stream's ownership; a lost stream first queues the cache's release behind its steps (on the step
        thread, so any later InitCache or step runs after it). Never awaits: it runs while the stream is cancelled."""
        if end is _StreamEnd.LOST:
            log.warning("control_plane_stream_lost", action="dropping every sequence and the KV cache")
            # RuntimeError: the step thread is shut down, so the server is stopping and the cache goes with it.
            with contextlib.suppress(RuntimeError):
                self._pipeline.call(self._worker.release_cache).add_done_callback(_log_release_failure)
        self._is_owned = False

    async def _launch_each(
        self,
        request_iterator: AsyncIterator[worker_service_pb2.ExecuteRequest],
        launched: asyncio.Queue[asyncio.Future[LaunchedStep] | BaseException | None],
        stream: LaunchStream,
    ) -> None:
        """Decodes each step as it arrives and submits its launch at once, without waiting for the launch before it
        (so the step thread finds the next step queued), and queues the launch for its reply. A decoding failure is
        queued in its place; a failed launch is raised by its own future; either ends the stream after the replies
        before it, and no step behind a failed launch is launched (LaunchStream)."""
        try:
            async for request in request_iterator:
                if not self._worker.is_cache_initialized:
                    raise CacheNotInitializedError("InitCache must run before Execute")
                await launched.put(self._pipeline.launch(codec.step_plan_from_proto(request), stream))
        except Exception as error:  # noqa: BLE001 - handed to the reply loop, which maps it to a status
            await launched.put(error)
            return
        await launched.put(None)


def _log_unreplied_failure(launch: asyncio.Future[LaunchedStep]) -> None:
    """The failure of a launch whose step gets no reply (its stream ended first: a launch that was running then, the
    others are not launched), which no status reports."""
    error = None if launch.cancelled() else launch.exception()
    if error is not None and not isinstance(error, StepNotLaunchedError):
        log.error("unreplied_step_failed", exc_info=error)


def _is_rejection(error: BaseException) -> bool:
    """Whether error refused a step before it changed anything (so the stream's earlier state stands)."""
    if isinstance(error, InvalidArgumentError):
        return True
    return type(error) in _STATUS_CODES


def _log_release_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("cache_release_failed", exc_info=done.exception())


@dataclass(frozen=True, slots=True)
class WorkerServer:
    """A started server: its bound port, health service and servicer (to close on stop)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: WorkerServicer

    async def stop(self, grace_s: float) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within grace_s, then frees the step thread."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.servicer.close()


async def start_server(
    worker: Worker, address: str, *, cluster_secret: ClusterSecret | None = None, enable_reflection: bool = False,
    credentials: grpc.ServerCredentials | None = None,
) -> WorkerServer:
    """Binds address (port 0 picks a free one), registers the services and starts serving; health SERVING.
    With cluster_secret every call but health checks must carry it (runtime/auth.py); None: no authentication,
    which main.py allows only with --insecure-no-auth. Reflection is off unless enabled. With credentials
    (grpc.ssl_server_credentials) the port speaks TLS, health included; None: plaintext."""
    interceptors = [] if cluster_secret is None else [ClusterSecretInterceptor(cluster_secret)]
    server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=interceptors)
    servicer = WorkerServicer(worker)
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        add_reflection(server, (_SERVICE_NAME, health.SERVICE_NAME))
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    for service in ("", _SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return WorkerServer(server, port, health_servicer, servicer)
