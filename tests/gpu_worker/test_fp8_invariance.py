"""With an FP8 KV cache, greedy tokens do not change with the schedule: preemption by recompute or swap (FP8 blocks
swapped out and back as bytes), chunked prefill, prefix-cache hits, n > 1 forks (copy-on-write of FP8 blocks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.contract.model_format import KVCacheDType
from tests.structured.test_constrained_invariance import PROMPT, ROOMY, SETUPS

# Ten prompts sharing PROMPT's two full blocks; their own endings make the continuations differ.
PROMPTS = [f"{PROMPT} Day {day}:" for day in range(10)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)


def _generate(llm: LLM, params: SamplingParams = GREEDY) -> list[list[list[int]]]:
    return [[completion.token_ids for completion in out.outputs] for out in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def reference() -> Iterator[list[list[list[int]]]]:
    with LLM(cache_config=ROOMY, worker_process=False, kv_cache_dtype=KVCacheDType.FP8) as llm:
        yield _generate(llm)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_fp8_kv_greedy_tokens_do_not_change_with_the_schedule(setup: str,
                                                              reference: list[list[list[int]]]) -> None:
    scheduler, cache = SETUPS[setup]
    with LLM(cache_config=cache, scheduler_config=scheduler, worker_process=False,
             kv_cache_dtype=KVCacheDType.FP8) as llm:
        if setup == "prefix_cached":
            _generate(llm)  # the second run finds the prompts' blocks cached
        tokens = _generate(llm)
        status = llm.status()
    assert tokens == reference
    # Each setup exercises its feature and only it.
    assert (status.num_preemptions > 0, status.prefix_cache_hits > 0) == (setup in ("recompute", "swap"),
                                                                          setup == "prefix_cached")


def test_fp8_kv_forks_of_an_n_greater_than_one_request_repeat_the_greedy_tokens(
    reference: list[list[list[int]]],
) -> None:
    with LLM(cache_config=ROOMY, worker_process=False, kv_cache_dtype=KVCacheDType.FP8) as llm:
        tokens = _generate(llm, SamplingParams(n=3, temperature=0.0, max_tokens=60, ignore_eos=True))
    assert tokens == [completions * 3 for completions in reference]
