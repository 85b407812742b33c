"""The internal services (WorkerService, EngineService) answer only callers that send the cluster secret: every
method refuses a missing or wrong one with UNAUTHENTICATED before it runs; health checks need none."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.contract.model_format import DeviceKind
from pagedserve.control_plane.engine.service import build_engine_server
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import (
    SECRET_ENV,
    ClusterSecret,
    ClusterSecretInterceptor,
    client_interceptors,
    cluster_secret_from,
    inherited_cluster_secret,
)
from pagedserve.v1 import engine_service_pb2, engine_service_pb2_grpc, worker_service_pb2
from tests.gpu_worker.harness import STORIES_DIR

SECRET = ClusterSecret("the-cluster-secret-0123456789")
WRONG = ClusterSecret("not-the-cluster-secret-987654")
WORKER_METHODS = list(worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].methods)
ENGINE_METHODS = list(engine_service_pb2.DESCRIPTOR.services_by_name["EngineService"].methods)
ROOT = Path(__file__).resolve().parents[1]


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]) -> None:
    """Calls method with one empty request message (undecoded bytes) and reads every reply."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    codec = {"request_serializer": _raw, "response_deserializer": _raw}

    async def one_request() -> AsyncIterator[bytes]:
        yield b""

    if method.client_streaming and method.server_streaming:
        async for _ in channel.stream_stream(path, **codec)(one_request(), metadata=metadata, timeout=10):
            pass
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **codec)(b"", metadata=metadata, timeout=10):
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, **codec)(one_request(), metadata=metadata, timeout=10)
    else:
        await channel.unary_unary(path, **codec)(b"", metadata=metadata, timeout=10)


def _raw(message: bytes) -> bytes:
    return message


async def _refusal(channel: grpc.aio.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]
                   ) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _call(channel, method, metadata)
    return error.value.code(), error.value.details() or ""


def _serve_worker(test: Callable[[grpc.aio.Channel, Worker, str], Awaitable[None]]) -> None:
    """Runs test against a stories260K CPU worker that requires SECRET, on a loopback port."""

    async def run() -> None:
        worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU))
        server = await start_server(worker, "127.0.0.1:0", cluster_secret=SECRET)
        address = f"127.0.0.1:{server.port}"
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await test(channel, worker, address)
        finally:
            await server.stop(0)

    asyncio.run(run())


class _RecordingEngineServicer(engine_service_pb2_grpc.EngineServiceServicer):
    """Records every call that reaches a method; Describe answers, the rest end at once."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Describe(self, request: Any, context: Any) -> engine_service_pb2.DescribeResponse:  # noqa: N802
        self.calls.append("Describe")
        return engine_service_pb2.DescribeResponse()

    async def GetStatus(self, request: Any, context: Any) -> engine_service_pb2.GetStatusResponse:  # noqa: N802
        self.calls.append("GetStatus")
        return engine_service_pb2.GetStatusResponse()

    async def Relay(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        self.calls.append("Relay")
        return
        yield

    async def WatchHealth(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        self.calls.append("WatchHealth")
        return
        yield

    async def WatchKvEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        self.calls.append("WatchKvEvents")
        return
        yield


def _serve_engine(test: Callable[[grpc.aio.Channel, _RecordingEngineServicer, str], Awaitable[None]],
                  tmp_path: Path) -> None:
    """Runs test against an engine server (with a recording servicer) that requires SECRET, on a Unix socket."""

    async def run() -> None:
        servicer = _RecordingEngineServicer()
        address = f"unix:{tmp_path / 'engine.sock'}"
        server = await build_engine_server(servicer, address, (ClusterSecretInterceptor(SECRET),))  # type: ignore[arg-type]
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await test(channel, servicer, address)
        finally:
            await server.stop(0)

    asyncio.run(run())


@pytest.mark.parametrize("sent", ["missing", "wrong"])
def test_every_worker_method_refuses_a_missing_or_wrong_secret_and_changes_nothing(sent: str) -> None:
    metadata = () if sent == "missing" else WRONG.metadata

    async def test(channel: grpc.aio.Channel, worker: Worker, address: str) -> None:
        refusals = {method.name: await _refusal(channel, method, metadata) for method in WORKER_METHODS}

        assert set(refusals) == {"GetWorkerInfo", "InitCache", "Execute"}
        for code, details in refusals.values():
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert details.startswith(f"{sent} cluster secret: ")
            assert "authorization: Bearer <secret>" in details
        assert not worker.is_cache_initialized  # InitCache never ran

    _serve_worker(test)


@pytest.mark.parametrize("sent", ["missing", "wrong"])
def test_every_engine_method_refuses_a_missing_or_wrong_secret_before_it_runs(sent: str, tmp_path: Path) -> None:
    metadata = () if sent == "missing" else WRONG.metadata

    async def test(channel: grpc.aio.Channel, servicer: _RecordingEngineServicer, address: str) -> None:
        refusals = {method.name: await _refusal(channel, method, metadata) for method in ENGINE_METHODS}

        assert set(refusals) == {"Describe", "GetStatus", "Relay", "WatchHealth", "WatchKvEvents"}
        assert {code for code, _ in refusals.values()} == {grpc.StatusCode.UNAUTHENTICATED}
        assert servicer.calls == []

    _serve_engine(test, tmp_path)


def test_health_checks_need_no_secret() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker, address: str) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]

        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    _serve_worker(test)


def test_the_worker_client_with_the_secret_is_served_and_without_it_is_told_why() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker, address: str) -> None:
        authorized, anonymous = GrpcWorkerClient(address, SECRET), GrpcWorkerClient(address)
        try:
            info = await authorized.get_info()
            with pytest.raises(WorkerUnavailableError) as refused:
                await anonymous.get_info()
        finally:
            await authorized.close()
            await anonymous.close()

        assert info.model == "stories260K"
        assert "GetWorkerInfo with UNAUTHENTICATED: missing cluster secret" in str(refused.value)

    _serve_worker(test)


def test_a_channel_with_the_client_interceptors_reaches_every_engine_method(tmp_path: Path) -> None:
    async def test(channel: grpc.aio.Channel, servicer: _RecordingEngineServicer, address: str) -> None:
        async with grpc.aio.insecure_channel(address, interceptors=client_interceptors(SECRET)) as authorized:
            for method in ENGINE_METHODS:
                await _call(authorized, method, metadata=())

        assert sorted(servicer.calls) == ["Describe", "GetStatus", "Relay", "WatchHealth", "WatchKvEvents"]

    _serve_engine(test, tmp_path)


def test_the_frontend_engine_client_sends_the_secret_it_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET.value)

    async def test(channel: grpc.aio.Channel, servicer: _RecordingEngineServicer, address: str) -> None:
        client = EngineClient(address, inherited_cluster_secret(os.environ))
        try:
            await client.describe(timeout_s=10)
        finally:
            await client.close()

        assert servicer.calls == ["Describe"]

    _serve_engine(test, tmp_path)


def test_a_secret_is_never_shown_and_must_be_long_and_plain() -> None:
    assert "the-cluster-secret" not in repr(SECRET)
    with pytest.raises(ValueError, match="at least 16 characters"):
        ClusterSecret("short")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        ClusterSecret("a secret with spaces in it")


def test_the_secret_comes_from_a_file_or_a_value_but_not_both(tmp_path: Path) -> None:
    path = tmp_path / "cluster_secret"
    path.write_text(SECRET.value + "\n")

    assert cluster_secret_from(path, None) == SECRET
    assert cluster_secret_from(None, SECRET.value) == SECRET
    assert cluster_secret_from(None, None) is None
    with pytest.raises(ValueError, match="given twice"):
        cluster_secret_from(path, SECRET.value)


def test_compose_hands_both_services_the_secret_from_a_compose_secret() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())

    assert set(compose["secrets"]) == {"cluster_secret"}
    for name in ("gpu-worker", "control-plane"):
        service = compose["services"][name]
        assert service["secrets"] == ["cluster_secret"]
        assert service["environment"]["PAGEDSERVE_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret"
