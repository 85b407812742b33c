"""A constrained request samples the same tokens whatever the scheduler does to it: preemption by recompute (the
worker replays its outputs into a fresh matcher) or by swap, chunked prefill, prefix-cache hits, n > 1 forks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.control_plane.config import CacheConfig, PreemptionMode, SchedulerConfig
from tests.structured.constraints import json_schema_cases

CASES = json_schema_cases()[:10]
# Over two blocks of 16 tokens, so that a second run finds full blocks in the prefix cache.
PROMPT = ("The harbour town woke slowly on winter mornings. Fishing boats came back before the sun was up, and the "
          "first light found the market already busy with crates of silver fish.")
ROOMY = CacheConfig(kv_cache_memory_bytes=64 << 20, swap_space_bytes=0, enable_prefix_caching=False)
SETUPS = {
    # 16 blocks of 16 tokens cannot hold ten sequences of ~60 tokens at once.
    "recompute": (SchedulerConfig(), CacheConfig(num_gpu_blocks_override=16, swap_space_bytes=0,
                                                 enable_prefix_caching=False)),
    "swap": (SchedulerConfig(preemption_mode=PreemptionMode.SWAP),
             CacheConfig(num_gpu_blocks_override=16, swap_space_bytes=16 << 20, enable_prefix_caching=False)),
    "chunked": (SchedulerConfig(max_num_batched_tokens=8), ROOMY),
    "prefix_cached": (SchedulerConfig(), CacheConfig(kv_cache_memory_bytes=64 << 20, swap_space_bytes=0)),
}


def _params() -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=60, structured_output=case.constraint)
            for i, case in enumerate(CASES)]


def _generate(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([PROMPT] * len(CASES), _params())
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def reference() -> Iterator[list[list[int]]]:
    with LLM(cache_config=ROOMY, worker_process=False) as llm:
        yield _generate(llm)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_constrained_tokens_do_not_change_with_the_schedule(setup: str, reference: list[list[int]]) -> None:
    scheduler, cache = SETUPS[setup]
    with LLM(cache_config=cache, scheduler_config=scheduler, worker_process=False) as llm:
        if setup == "prefix_cached":
            _generate(llm)  # the second run finds the prompt's blocks cached
        tokens = _generate(llm)
        status = llm.status()
    assert tokens == reference
    if setup in ("recompute", "swap"):
        assert status.num_preemptions > 0
    if setup == "prefix_cached":
        assert status.prefix_cache_hits > 0


def test_each_fork_of_an_n_greater_than_one_request_follows_the_constraint() -> None:
    choices = ("alpha", "beta", "gamma", "delta")
    constraint = StructuredOutput(ConstraintKind.CHOICE, choices=choices)
    with LLM(cache_config=ROOMY, worker_process=False) as llm:
        output = llm.generate(["x"], SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=20,
                                                    structured_output=constraint))[0]
    assert [completion.text in choices for completion in output.outputs] == [True] * 8
    assert len({completion.text for completion in output.outputs}) > 1  # the forks sample on their own


def test_a_constraint_that_does_not_compile_is_refused_before_anything_is_allocated() -> None:
    bad = [
        StructuredOutput(ConstraintKind.JSON_SCHEMA, '{"type": "objekt"}'),
        StructuredOutput(ConstraintKind.JSON_SCHEMA, "{not json"),
        StructuredOutput(ConstraintKind.REGEX, "[a-z"),
        StructuredOutput(ConstraintKind.GRAMMAR, "start: undefined_rule"),
        StructuredOutput(ConstraintKind.STRUCTURAL_TAG, '{"structures": [], "triggers": []}'),
    ]
    with LLM(cache_config=ROOMY, worker_process=False) as llm:
        for constraint in bad:
            with pytest.raises(InvalidArgumentError, match=f"^structured_output.{constraint.kind.value}: cannot be"):
                llm.generate(["x"], SamplingParams(structured_output=constraint))
        status = llm.status()
    assert (status.num_steps, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)
