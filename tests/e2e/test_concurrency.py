"""Continuous batching through the real path: concurrent streams return what each returns alone."""

from __future__ import annotations

import asyncio
import random

import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams

pytestmark = pytest.mark.e2e


def _workload(seed: int, count: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 48))
            for _ in range(count)]


async def _run(address: str, workload: list[tuple[list[int], int]], concurrently: bool) -> list[list[int]]:
    async with PagedServeClient(address) as client:
        async def one(prompt: list[int], max_tokens: int) -> list[int]:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            (completion,) = await client.generate(prompt, params, timeout_s=120)
            return completion.token_ids

        if concurrently:
            return list(await asyncio.gather(*(one(p, m) for p, m in workload)))
        return [await one(p, m) for p, m in workload]


def test_sixteen_concurrent_streams_return_exactly_what_each_returns_alone(stories_cluster) -> None:
    workload = _workload(seed=7, count=16)
    alone = asyncio.run(_run(stories_cluster.address, workload, concurrently=False))
    together = asyncio.run(_run(stories_cluster.address, workload, concurrently=True))
    assert together == alone
    assert [len(tokens) for tokens in alone] == [m for _, m in workload]
