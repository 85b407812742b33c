"""Planning one step ahead: step N+1 is scheduled before step N's result is applied, with the same tokens."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from pagedserve.contract.step import BlockTableUpdate, ScheduledSequence, StepPlan
from pagedserve.control_plane.config import PreemptionMode, SchedulingPolicy
from pagedserve.control_plane.errors import ResourceExhaustedError
from pagedserve.control_plane.scheduling.request import FinishReason, Request
from pagedserve.control_plane.scheduling.scheduler import Scheduler

from .factories import (
    EOS,
    assert_scheduler_invariants,
    default_next_token,
    make_request,
    make_scheduler,
    make_worker,
    run,
)


def test_decode_is_planned_again_before_the_token_it_computes_has_arrived() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 18)))
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert second.scheduled_sequences == (ScheduledSequence(0, 1, (BlockTableUpdate(2, (2,)),)),)
    first_deltas = scheduler.update_from_output(first, worker.execute(first))
    second_deltas = scheduler.update_from_output(second, worker.execute(second))
    assert [len(d.new_token_ids) for d in first_deltas + second_deltas] == [1, 1]


def test_lag_never_schedules_a_sequence_past_max_tokens() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 16), max_tokens=2))
    first, second = scheduler.schedule(), scheduler.schedule()
    assert scheduler.schedule().is_empty
    outputs = [worker.execute(first), worker.execute(second)]
    deltas = scheduler.update_from_output(first, outputs[0]) + scheduler.update_from_output(second, outputs[1])
    assert [d.finish_reason for d in deltas] == [None, FinishReason.LENGTH]
    assert worker.num_computed_tokens == 6 + 1


def test_token_computed_after_eos_is_discarded_and_the_sequence_dropped() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler, lambda tokens, index: EOS)
    scheduler.add_request(make_request("a", range(10, 16)))
    first, second = scheduler.schedule(), scheduler.schedule()
    outputs = [worker.execute(first), worker.execute(second)]
    first_deltas = scheduler.update_from_output(first, outputs[0])
    assert [(d.new_token_ids, d.finish_reason) for d in first_deltas] == [((EOS,), FinishReason.STOP)]
    assert scheduler.update_from_output(second, outputs[1]) == []
    assert scheduler.schedule().dropped_seq_ids == (0,)
    assert (worker.num_computed_tokens, scheduler.stats.num_used_blocks) == (6 + 1, 0)


def test_results_of_a_request_aborted_in_flight_are_ignored() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 16)))
    first, second = scheduler.schedule(), scheduler.schedule()
    scheduler.abort_request("a")
    assert scheduler.update_from_output(first, worker.execute(first)) == []
    assert scheduler.update_from_output(second, worker.execute(second)) == []
    assert scheduler.schedule().dropped_seq_ids == (0,)


@pytest.mark.parametrize("steps_in_flight", [1, 2, 4])
def test_prompt_logprobs_skip_the_cache_and_are_delivered_once_across_a_recompute(steps_in_flight: int) -> None:
    scheduler = make_scheduler(num_blocks=5, max_num_batched_tokens=4)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("warm", range(10, 18), max_tokens=1))
    run(scheduler, worker)
    scheduler.add_request(make_request("b", range(40, 52), max_tokens=4, arrival_time_s=0.0))
    scheduler.add_request(make_request("a", range(10, 18), max_tokens=2, prompt_logprobs=1, arrival_time_s=1.0))
    result = run(scheduler, worker, steps_in_flight=steps_in_flight)
    # a's prefill is preempted part-way, so some of its prompt positions are computed twice.
    assert scheduler.stats.num_preemptions >= 1
    delivered = [p for d in result.deltas if d.request_id == "a" for p in d.prompt_logprobs]
    assert [(p.token_id, p.logprob) for p in delivered] == [(10 + i, -float(i)) for i in range(8)]
    starts = [s.num_computed_tokens for p in result.plans for s in p.new_sequences if s.prompt_token_ids[0] == 10]
    assert starts == [0] * len(starts)
    assert len(starts) == 1 + scheduler.stats.num_preemptions


def _random_requests(seed: int) -> list[Request]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 900) for _ in range(20)]
    requests = []
    for i in range(rng.randrange(1, 14)):
        length = rng.randrange(1, 20)
        prompt = shared[:length] if rng.random() < 0.5 else [rng.randrange(3, 900) for _ in range(length)]
        max_tokens = rng.randrange(1, 30)
        requests.append(make_request(
            f"r{i}", prompt, max_tokens=max_tokens, arrival_time_s=float(i), priority=rng.randrange(3),
            n=rng.choice([1, 1, 2, 4]), min_tokens=rng.choice([0, 0, min(3, max_tokens)]),
            prompt_logprobs=rng.choice([None, None, 1]),
        ))
    return requests


def _sometimes_eos(tokens: Sequence[int], index: int) -> int:
    token = default_next_token(tokens, index)
    return EOS if token % 23 == 0 else token


def _add_all(scheduler: Scheduler, requests: list[Request]) -> None:
    for request in requests:
        with contextlib.suppress(ResourceExhaustedError):
            scheduler.add_request(request)


def _checks_invariants_of(scheduler: Scheduler) -> Callable[[int, StepPlan], None]:
    """An on_step callback bound to this scheduler (a lambda in the loop would close over the loop variable)."""
    return lambda index, plan: assert_scheduler_invariants(scheduler)


@pytest.mark.parametrize("seed", range(60))
def test_pipelined_loops_yield_the_tokens_of_the_synchronous_loop(seed: int) -> None:
    rng = random.Random(seed)
    config: dict[str, Any] = dict(
        num_blocks=rng.randrange(3, 16), block_size=rng.choice([1, 2, 4, 8]),
        num_cpu_blocks=rng.choice([0, 4, 40]), max_num_batched_tokens=rng.choice([4, 8, 16, 2048]),
        max_num_seqs=rng.choice([4, 256]), policy=rng.choice(list(SchedulingPolicy)),
        preemption_mode=rng.choice(list(PreemptionMode)), enable_prefix_caching=rng.random() < 0.8,
        long_prefill_token_threshold=rng.choice([0, 0, 3]),
    )
    results = []
    for steps_in_flight in (1, 2, 3, 4):
        scheduler = make_scheduler(**config)
        worker = make_worker(scheduler, _sometimes_eos)
        _add_all(scheduler, _random_requests(seed))
        result = run(scheduler, worker, steps_in_flight=steps_in_flight,
                     on_step=_checks_invariants_of(scheduler))
        assert (scheduler.stats.num_used_blocks, scheduler.block_manager.cpu.num_used_blocks) == (0, 0)
        worker.execute(scheduler.schedule())
        assert worker.seqs == {}
        results.append(result)
    synchronous, *pipelined = results
    for each in pipelined:
        assert each.tokens == synchronous.tokens
        assert each.finish_reasons == synchronous.finish_reasons
    # Alone in a pool of the same size, each request gets the same tokens: preemption changes none.
    for request in _random_requests(seed):
        alone = make_scheduler(num_blocks=config["num_blocks"], block_size=config["block_size"])
        _add_all(alone, [request])
        expected = run(alone, make_worker(alone, _sometimes_eos)).tokens
        assert {key: synchronous.tokens[key] for key in expected} == expected



def _plans(config: dict[str, Any], requests: list[Request]) -> list[StepPlan]:
    scheduler = make_scheduler(**config)
    _add_all(scheduler, requests)
    seen: list[StepPlan] = []
    run(scheduler, make_worker(scheduler, _sometimes_eos), steps_in_flight=4,
        on_step=lambda index, plan: seen.append(plan))
    return seen


@pytest.mark.parametrize("seed", range(30))
def test_one_token_decode_path_plans_what_the_general_path_plans(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    config: dict[str, Any] = dict(
        num_blocks=rng.randrange(3, 16), block_size=rng.choice([1, 2, 4, 8]),
        num_cpu_blocks=rng.choice([0, 4, 40]), max_num_batched_tokens=rng.choice([4, 8, 16, 2048]),
        policy=rng.choice(list(SchedulingPolicy)), preemption_mode=rng.choice(list(PreemptionMode)),
        enable_prefix_caching=rng.random() < 0.8,
    )
    with_fast_path = _plans(config, _random_requests(seed))
    monkeypatch.setattr(Scheduler, "_extend_by_one_token", lambda self, request, step: False)
    assert with_fast_path == _plans(config, _random_requests(seed))


def test_plain_decode_steps_take_the_one_token_path(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_path = Scheduler._extend_by_one_token
    outcomes: list[bool] = []

    def recorded(self: Scheduler, request: Request, step: Any) -> bool:
        outcomes.append(fast_path(self, request, step))
        return outcomes[-1]

    monkeypatch.setattr(Scheduler, "_extend_by_one_token", recorded)
    plans = _plans(dict(num_blocks=8, block_size=4), [make_request("r", [5, 6, 7], max_tokens=6)])
    assert [p.num_scheduled_tokens for p in plans] == [3, 1, 1, 1, 1, 1, 0]  # the last plan drops it
    # Each decode step, planned ahead of the results or not; it declines once max_tokens are planned.
    assert outcomes.count(True) == 5
