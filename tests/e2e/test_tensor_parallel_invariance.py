"""A tensor-parallel group (2 ranks, gloo) gives the tokens of one worker with an ample pool under memory pressure:
preemption by recompute and by swap, prefix-cache hits, and parallel sampling (n > 1, seeded)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.control_plane.config import CacheConfig, PreemptionMode, SchedulerConfig

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 16
AMPLE = CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)
# 16 blocks of 16 tokens: a third of what the workload's 8 requests need at once, so the newest are preempted.
SMALL = CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks_override=16, swap_space_bytes=4 << 20)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """8 prompts sharing a 40-token prefix (prefix-cache hits), each with 24 to 40 greedy tokens, and one seeded
    request of n = 2."""
    rng = random.Random(19)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [[1, *shared, *(rng.randrange(3, 512) for _ in range(rng.randrange(1, 24)))] for _ in range(8)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(24, 40), ignore_eos=True) for _ in prompts]
    params[5] = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=32, ignore_eos=True)
    return prompts, params


def _generate(model_dir: Path, cache: CacheConfig, scheduler: SchedulerConfig, tensor_parallel_size: int,
              ) -> tuple[list[list[list[int]]], int, int]:
    """(token ids per prompt per completion, preemptions, prefix-cache hits)."""
    prompts, params = _workload()
    with LLM(model_dir, device="cpu", cache_config=cache, scheduler_config=scheduler,
             worker_process=tensor_parallel_size > 1, tensor_parallel_size=tensor_parallel_size) as llm:
        outputs = llm.generate(prompts, params)
        status = llm.status()
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_swapped) == (0, 0, 0)
    tokens = [[list(completion.token_ids) for completion in output.outputs] for output in outputs]
    return tokens, status.num_preemptions, status.prefix_cache_hits


@pytest.fixture(scope="module")
def one_worker_tokens(stories260k_dir: Path) -> list[list[list[int]]]:
    tokens, num_preemptions, _ = _generate(stories260k_dir, AMPLE, SchedulerConfig(), tensor_parallel_size=1)
    assert num_preemptions == 0
    return tokens


@pytest.mark.parametrize("mode", [PreemptionMode.RECOMPUTE, PreemptionMode.SWAP], ids=["recompute", "swap"])
def test_two_ranks_under_preemption_and_prefix_hits_give_one_workers_tokens(
    stories260k_dir: Path, one_worker_tokens: list[list[list[int]]], mode: PreemptionMode,
) -> None:
    tokens, num_preemptions, prefix_cache_hits = _generate(
        stories260k_dir, SMALL, SchedulerConfig(preemption_mode=mode), tensor_parallel_size=2)

    assert tokens == one_worker_tokens
    assert num_preemptions > 0 and prefix_cache_hits > 0
