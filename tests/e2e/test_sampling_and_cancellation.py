"""Parallel sampling, stop strings and cancellation through the real path."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams
from pagedserve.clients.errors import Cancelled, DeadlineExceeded
from pagedserve.v1 import generation_service_pb2

pytestmark = pytest.mark.e2e


def test_n4_seeded_children_differ_and_reproduce(stories_cluster) -> None:
    async def run() -> list[list[int]]:
        async with PagedServeClient(stories_cluster.address) as client:
            params = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
            completions = await client.generate("Once upon a time", params, timeout_s=60)
            return [c.token_ids for c in completions]

    first, second = asyncio.run(run()), asyncio.run(run())
    assert first == second
    assert len(first) == 4 and all(len(tokens) == 24 for tokens in first)
    assert len({tuple(tokens) for tokens in first}) == 4


def test_stop_string_spanning_tokens_never_leaks_into_the_stream(stories_cluster, golden) -> None:
    # The golden continuation contains "little girl named Lily"; "girl na" spans several tokens.
    async def run(include: bool) -> list[generation_service_pb2.GenerateResponse]:
        async with PagedServeClient(stories_cluster.address) as client:
            params = SamplingParams(temperature=0.0, max_tokens=60, stop=("girl na",),
                                    include_stop_str_in_output=include)
            return [chunk async for chunk in client.generate_stream(golden["prompt"], params)]

    continuation = golden["greedy_text"][len(golden["prompt"]):]
    before = continuation[: continuation.index("girl na")]
    excluded = asyncio.run(run(include=False))
    assert "".join(c.text for c in excluded) == before
    assert excluded[-1].finish_reason == generation_service_pb2.FINISH_REASON_STOP
    assert excluded[-1].stop_reason == "girl na"
    included = asyncio.run(run(include=True))
    assert "".join(c.text for c in included) == before + "girl na"


def test_two_hundred_requests_cancelled_at_random_points_leak_nothing(stories_cluster) -> None:
    rng = random.Random(42)

    async def one(client: PagedServeClient, delay_s: float, max_tokens: int) -> None:
        prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 200))]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        task = asyncio.create_task(client.generate(prompt, params, timeout_s=120))
        await asyncio.sleep(delay_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Cancelled, DeadlineExceeded):
            await task

    async def run() -> generation_service_pb2.GetServerStatusResponse:
        async with PagedServeClient(stories_cluster.address) as client:
            await asyncio.gather(*(one(client, rng.uniform(0.0, 0.5), rng.randrange(1, 300)) for _ in range(200)))
            deadline = time.monotonic() + 20
            while True:
                status = await client.server_status()
                idle = (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks)
                if idle == (0, 0, 0) or time.monotonic() > deadline:
                    return status
                await asyncio.sleep(0.05)

    status = asyncio.run(run())
    assert (status.num_requests_running, status.num_requests_waiting, status.num_used_blocks) == (0, 0, 0)
