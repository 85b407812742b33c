"""The control plane's side of WorkerService: info, cache set-up and the Execute step stream."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.contract.codec import (
    cache_info_from_proto,
    cache_request_to_proto,
    step_plan_to_proto,
    step_result_from_proto,
    worker_info_from_proto,
)
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.runtime.auth import ClusterSecret
from pagedserve.runtime.channel_options import INTERNAL_CHANNEL_OPTIONS
from pagedserve.v1 import worker_service_pb2, worker_service_pb2_grpc

# How long a failed write waits for its stream's status: a write fails only once the stream has ended, so the status
# is there or on its way; the wait only bounds a stream that somehow has not ended.
ENDED_STATUS_WAIT_S = 1.0


class WorkerConnection(Protocol):
    """How the control plane reaches one worker: over gRPC, or in-process for the offline API. Both speak the
    step contract's types; only the gRPC one encodes them."""

    async def get_info(self) -> WorkerInfo: ...

    async def init_cache(self, request: CacheRequest) -> CacheInfo: ...

    async def send(self, plan: StepPlan) -> None: ...

    async def receive(self) -> StepResult: ...

    async def close(self) -> None: ...


class GrpcWorkerClient:
    """One worker reached over gRPC. Steps go out on one bidirectional stream and come back in order. Every call
    but the health checks carries cluster_secret (None: the worker runs with --insecure-no-auth). With credentials
    (grpc.ssl_channel_credentials) the channel speaks TLS and checks the worker's certificate, against server_name
    when given (default: the host of address); without them, plaintext."""

    def __init__(self, address: str, cluster_secret: ClusterSecret | None = None,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> None:
        self.address = address
        # Passed on each call rather than by a channel interceptor, which would add a hop to every step message.
        self._metadata = cluster_secret.metadata if cluster_secret is not None else ()
        if credentials is None:
            if server_name is not None:
                raise ValueError("a TLS server name needs TLS credentials")
            self._channel = grpc.aio.insecure_channel(address, options=INTERNAL_CHANNEL_OPTIONS)
        else:
            name = () if server_name is None else (("grpc.ssl_target_name_override", server_name),)
            options = (*INTERNAL_CHANNEL_OPTIONS, *name)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self._call: grpc.aio.StreamStreamCall[
            worker_service_pb2.ExecuteRequest, worker_service_pb2.ExecuteResponse
        ] | None = None

    async def wait_until_serving(self, timeout_s: float) -> None:
        """Polls the worker's health service until SERVING; raises WorkerUnavailableError after timeout_s."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                # types-grpcio-health-checking declares HealthStub without its methods (set in __init__ at run time).
                reply = await health.Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise WorkerUnavailableError(f"worker at {self.address} not serving after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)

    async def get_info(self) -> WorkerInfo:
        """The worker's model and device; WorkerUnavailableError (with the worker's code and message) on failure."""
        try:
            reply = await self._stub.GetWorkerInfo(worker_service_pb2.GetWorkerInfoRequest(), metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._failed("GetWorkerInfo", exc) from exc
        return worker_info_from_proto(reply)

    async def init_cache(self, request: CacheRequest) -> CacheInfo:
        """Resets and sizes the worker's KV cache; WorkerUnavailableError on failure (FAILED_PRECONDITION: another
        control plane owns the worker)."""
        try:
            reply = await self._stub.InitCache(cache_request_to_proto(request), metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._failed("InitCache", exc) from exc
        return cache_info_from_proto(reply)

    def _failed(self, method: str, exc: grpc.aio.AioRpcError) -> WorkerUnavailableError:
        return WorkerUnavailableError(f"worker at {self.address} answered {method} with {exc.code().name}: "
                                      f"{exc.details()}")

    def _stream(
        self,
    ) -> grpc.aio.StreamStreamCall[worker_service_pb2.ExecuteRequest, worker_service_pb2.ExecuteResponse]:
        """The Execute stream, opened on first use: from then on this control plane owns the worker."""
        if self._call is None:
            self._call = self._stub.Execute(metadata=self._metadata)
        return self._call

    async def wait_closed(self) -> str | None:
        """Returns once the step stream has ended, however (the worker died, refused or ended it, or close()), even
        while no step is in flight: the engine's idle lanes notice a dead worker by it. Opens the stream. Says how
        it failed: the worker's status and details, as receive() would have raised them (None for a clean end)."""
        call = self._stream()
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return None
        return f"worker at {self.address} failed: {code.name}: {await call.details()}"

    async def send(self, plan: StepPlan) -> None:
        """Queues one step on the Execute stream (opened on first use). A write fails when the stream has ended
        (grpc raises AioRpcError, UsageError, or InvalidStateError "RPC already finished" once the status has come);
        WorkerUnavailableError then says what the worker's status said, as receive() does: the write's own error
        may be the transport's instead (grpc's "Internal error from Core" when the stream ended under the write)."""
        call = self._stream()
        try:
            await call.write(step_plan_to_proto(plan))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            try:
                ended = await asyncio.wait_for(self.wait_closed(), ENDED_STATUS_WAIT_S)
            except asyncio.TimeoutError:
                ended = None
            raise WorkerUnavailableError(ended or f"worker at {self.address} failed: {exc}") from exc

    async def receive(self) -> StepResult:
        """The result of the oldest step sent and not yet received."""
        if self._call is None:
            raise RuntimeError("receive() before send()")
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise WorkerUnavailableError(
                f"worker at {self.address} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        if reply is grpc.aio.EOF:
            raise WorkerUnavailableError(f"worker at {self.address} closed the step stream")
        # grpc-stubs types read() as `object | ExecuteResponse` (EOF's type is object); EOF was ruled out above.
        return step_result_from_proto(cast(worker_service_pb2.ExecuteResponse, reply))

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()
