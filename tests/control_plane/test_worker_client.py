"""The control plane's gRPC client of a worker reports what the worker said, whichever call finds the stream ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from pagedserve.contract.step import StepPlan
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.v1 import worker_service_pb2, worker_service_pb2_grpc


class _FailingWorker(worker_service_pb2_grpc.WorkerServiceServicer):
    """Ends the step stream with INTERNAL at the first step, as the worker service does when a step raises."""

    async def Execute(
        self, request_iterator: AsyncIterator[worker_service_pb2.ExecuteRequest],
        context: grpc.aio.ServicerContext[worker_service_pb2.ExecuteRequest, worker_service_pb2.ExecuteResponse],
    ) -> None:
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.INTERNAL, "internal worker error")


async def _send_until_refused(client: GrpcWorkerClient) -> WorkerUnavailableError:
    for step_id in range(1000):
        try:
            await client.send(StepPlan(step_id=step_id))
        except WorkerUnavailableError as error:
            return error
        await asyncio.sleep(0.01)
    raise AssertionError("every write was taken after the worker ended the stream")


def test_a_write_after_the_worker_ended_the_stream_reports_the_workers_status() -> None:
    async def scenario() -> tuple[str, WorkerUnavailableError]:
        server = grpc.aio.server()
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(_FailingWorker(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        client = GrpcWorkerClient(address)
        try:
            return address, await _send_until_refused(client)
        finally:
            await client.close()
            await server.stop(grace=None)

    address, error = asyncio.run(scenario())
    assert str(error) == f"worker at {address} failed: INTERNAL: internal worker error"

