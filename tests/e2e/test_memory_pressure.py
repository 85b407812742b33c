"""Outputs do not change under memory pressure: preemption by recompute or swap, tiny token budgets and prefix
caching all give the tokens an ample pool gives, and every block is free once the requests are done."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams
from tests.e2e.processes import running_cluster

pytestmark = pytest.mark.e2e

SMALL_POOLS = ["--kv-cache-memory", "0.02", "--swap-space", "0.02"]


def _prompts(seed: int, shared_prefix: list[int]) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1, *shared_prefix] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))],
             rng.randrange(8, 64)) for _ in range(64)]


async def _run_all(address: str, workload: list[tuple[list[int], int]]):
    async with PagedServeClient(address) as client:
        async def one(prompt: list[int], max_tokens: int) -> list[int]:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            (completion,) = await client.generate(prompt, params, timeout_s=300)
            return completion.token_ids

        tokens = await asyncio.gather(*(one(p, m) for p, m in workload))
        return tokens, await client.server_status()


def _outputs(model_dir: Path, log_dir: Path, serve_args: list[str], workload):
    with running_cluster(model_dir, log_dir, serve_args=[*SMALL_POOLS, *serve_args]) as cluster:
        return asyncio.run(_run_all(cluster.address, workload))


@pytest.fixture(scope="module")
def workload() -> list[tuple[list[int], int]]:
    return _prompts(seed=3, shared_prefix=[])


@pytest.fixture(scope="module")
def ample(stories_dir, workload, tmp_path_factory):
    tokens, status = _outputs(stories_dir, tmp_path_factory.mktemp("ample"), [], workload)
    assert status.num_preemptions == 0
    return tokens


@pytest.mark.parametrize(
    ("case", "serve_args"),
    [
        ("recompute", ["--num-gpu-blocks-override", "48"]),
        ("swap", ["--num-gpu-blocks-override", "48", "--preemption-mode", "swap"]),
        ("recompute, one step in flight", ["--num-gpu-blocks-override", "48", "--max-steps-in-flight", "1"]),
    ],
)
def test_preemption_gives_the_same_tokens_and_frees_every_block(
    stories_dir, workload, ample, tmp_path, case, serve_args
) -> None:
    tokens, status = _outputs(stories_dir, tmp_path, serve_args, workload)
    assert tokens == ample
    assert status.num_preemptions > 0, case
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting,
            status.num_requests_swapped) == (0, 0, 0, 0)


def test_a_32_token_budget_chunks_prefills_without_changing_tokens(stories_dir, workload, ample, tmp_path) -> None:
    tokens, status = _outputs(stories_dir, tmp_path, ["--max-num-batched-tokens", "32"], workload)
    assert tokens == ample
    assert status.num_used_blocks == 0


def test_shared_prefixes_hit_the_prefix_cache_without_changing_tokens(stories_dir, tmp_path) -> None:
    shared = [random.Random(11).randrange(3, 512) for _ in range(47)]
    workload = _prompts(seed=5, shared_prefix=shared)
    cached, cached_status = _outputs(stories_dir, tmp_path / "on", [], workload)
    uncached, uncached_status = _outputs(stories_dir, tmp_path / "off", ["--no-enable-prefix-caching"], workload)
    assert cached == uncached
    assert cached_status.prefix_cache_hits > 0 and uncached_status.prefix_cache_hits == 0
    assert cached_status.num_used_blocks == 0
