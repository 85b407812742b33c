"""The client's retry rule against a scripted server: RESOURCE_EXHAUSTED and UNAVAILABLE are retried with backoff,
except when the server's grpc-retry-pushback-ms trailer says not to; a valid pushback sets the wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from pagedserve.clients.client import PagedServeClient
from pagedserve.clients.errors import ResourceExhausted
from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc

# request_id -> the trailers of each refusal; the call after the last refusal succeeds.
SCRIPTS: dict[str, list[tuple[tuple[str, str], ...]]] = {
    "queue-full": [(), ()],
    "never-fits": [(("grpc-retry-pushback-ms", "-1"),)] * 3,
    "garbled": [(("grpc-retry-pushback-ms", "soon"),)] * 3,
    "pushback": [(("grpc-retry-pushback-ms", "300"),)],
}


class _ScriptedServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        calls = self.calls.setdefault(request.request_id, [])
        calls.append(time.monotonic())
        script = SCRIPTS[request.request_id]
        if len(calls) <= len(script):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", script[len(calls) - 1])
        yield pb.GenerateResponse(request_id=request.request_id, token_ids=[7], finish_reason=pb.FINISH_REASON_STOP,
                                  usage=pb.Usage(completion_tokens=1))


async def _generate(request_id: str) -> tuple[list[float], int | str]:
    servicer = _ScriptedServicer()
    server = grpc.aio.server()
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with PagedServeClient(f"127.0.0.1:{port}", max_retries=3, backoff_s=0.01) as client:
            try:
                chunks = [chunk async for chunk in client.generate_stream([1, 2], request_id=request_id)]
                outcome: int | str = chunks[-1].token_ids[0]
            except ResourceExhausted as error:
                outcome = error.message
    finally:
        await server.stop(grace=None)
    return servicer.calls[request_id], outcome


@pytest.mark.parametrize(("request_id", "num_calls", "outcome"), [
    ("queue-full", 3, 7),
    ("never-fits", 1, "busy"),
    ("garbled", 1, "busy"),
])
def test_resource_exhausted_is_retried_unless_the_pushback_says_not_to(request_id: str, num_calls: int,
                                                                       outcome: int | str) -> None:
    calls, result = asyncio.run(_generate(request_id))
    assert (len(calls), result) == (num_calls, outcome)


def test_a_pushback_in_milliseconds_sets_the_wait_before_the_retry() -> None:
    calls, result = asyncio.run(_generate("pushback"))
    assert (len(calls), result) == (2, 7)
    assert calls[1] - calls[0] >= 0.3  # the client's own backoff would be at most 0.015 s
