"""Exact schedules: budget, chunking, limits, priority admission, prefix cache, aborts, stops."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagedserve.contract.step import BlockTableUpdate, ScheduledSequence, StepPlan
from pagedserve.control_plane.config import PreemptionMode, SchedulingPolicy
from pagedserve.control_plane.errors import InvalidArgumentError, NeverFitsError, ResourceExhaustedError
from pagedserve.control_plane.scheduling.request import FinishReason, RequestStatus
from pagedserve.control_plane.scheduling.scheduler import Scheduler

from .factories import (
    EOS,
    FakeWorker,
    TokenFn,
    assert_scheduler_invariants,
    make_request,
    make_requests,
    make_scheduler,
    make_worker,
    run,
    step_once,
)


def test_running_decode_is_scheduled_before_a_new_prefill_which_gets_the_rest_of_the_budget() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("early", range(10, 16)))
    first, _ = step_once(scheduler, worker)
    assert [(s.seq_id, s.block_ids, s.num_scheduled_tokens) for s in first.new_sequences] == [(0, (0, 1), 6)]
    scheduler.add_request(make_request("late", range(50, 60)))
    second, _ = step_once(scheduler, worker)
    assert second.scheduled_sequences == (ScheduledSequence(0, 1),)
    assert [(s.seq_id, s.block_ids, s.num_scheduled_tokens) for s in second.new_sequences] == [(1, (2, 3), 7)]


def test_long_prompt_is_chunked_to_the_token_budget() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=4)
    scheduler.add_request(make_requests(1, prompt_len=10, max_tokens=2)[0])
    result = run(scheduler, make_worker(scheduler))
    new = result.plans[0].new_sequences[0]
    assert (new.block_ids, new.num_computed_tokens, new.num_scheduled_tokens) == ((0,), 0, 4)
    assert [p.scheduled_sequences for p in result.plans[1:]] == [
        (ScheduledSequence(0, 4, (BlockTableUpdate(1, (1,)),)),),
        (ScheduledSequence(0, 2, (BlockTableUpdate(2, (2,)),)),),
        (ScheduledSequence(0, 1),),
        (),
    ]
    assert result.plans[-1].dropped_seq_ids == (0,)
    assert [len(d.new_token_ids) for d in result.deltas] == [1, 1]


def test_prefills_share_the_budget_in_arrival_order() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    for request in make_requests(3, prompt_len=6):
        scheduler.add_request(request)
    plan = scheduler.schedule()
    assert [(s.seq_id, s.num_scheduled_tokens) for s in plan.new_sequences] == [(0, 6), (1, 2)]
    assert plan.num_scheduled_tokens == 8
    assert scheduler.stats.num_waiting == 1


def test_max_num_seqs_limits_the_running_sequences() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=2)
    for request in make_requests(3, prompt_len=4):
        scheduler.add_request(request)
    plan = scheduler.schedule()
    assert [s.seq_id for s in plan.new_sequences] == [0, 1]
    assert (scheduler.stats.num_running, scheduler.stats.num_waiting) == (2, 1)


def test_priority_policy_admits_lower_priority_values_first_then_by_arrival() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=1, policy=SchedulingPolicy.PRIORITY)
    for request_id, priority, arrival in (("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)):
        scheduler.add_request(make_request(request_id, [7, 8], max_tokens=1, arrival_time_s=arrival,
                                           priority=priority))
    result = run(scheduler, make_worker(scheduler))
    assert [d.request_id for d in result.deltas] == ["b", "d", "c", "a"]


def test_a_new_sequence_carries_the_request_sampling_params_and_the_ids_banned_before_min_tokens() -> None:
    scheduler = make_scheduler(num_blocks=8)
    request = make_request("a", range(10, 16), min_tokens=2, stop_token_ids=(7,))
    scheduler.add_request(request)
    (new,) = scheduler.schedule().new_sequences
    assert (new.sampling_params, new.banned_token_ids) == (request.sampling_params, (EOS, 7))


def test_prefix_cache_hit_reuses_exact_blocks_and_counts_tokens() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 20), max_tokens=1))
    run(scheduler, worker)
    assert scheduler.block_manager.gpu.free_queue() == (3, 4, 5, 6, 7, 2, 1, 0)
    scheduler.add_request(make_request("b", [*range(10, 18), 90, 91, 92], max_tokens=1))
    plan = scheduler.schedule()
    (new,) = plan.new_sequences
    assert (new.block_ids, new.num_computed_tokens, new.num_scheduled_tokens) == ((0, 1, 3), 8, 3)
    assert (scheduler.stats.prefix_cache_queries, scheduler.stats.prefix_cache_hits) == (21, 8)
    request = scheduler.get_request("b")
    assert request is not None and request.num_cached_tokens == 8


def test_prefix_cache_evicts_the_least_recently_freed_block_first() -> None:
    scheduler = make_scheduler(num_blocks=4)
    worker = make_worker(scheduler)
    for request_id, prompt in (("a", range(10, 15)), ("b", range(20, 25)), ("c", range(30, 35))):
        scheduler.add_request(make_request(request_id, prompt, max_tokens=1))
        run(scheduler, worker)
    # a cached block 0, then b cached block 2; c took blocks 1 and 0, evicting a's block, not b's.
    bm = scheduler.block_manager
    assert bm.find_cached_prefix(list(range(10, 15))).block_ids == ()
    assert bm.find_cached_prefix(list(range(20, 25))).block_ids == (2,)
    assert bm.find_cached_prefix(list(range(30, 35))).block_ids == (1,)


def test_a_plan_comes_back_before_its_blocks_are_hashed_and_the_next_call_caches_them_first() -> None:
    scheduler = make_scheduler(num_blocks=8)
    bm = scheduler.block_manager
    scheduler.add_request(make_request("a", range(10, 19)))
    plan = scheduler.schedule()
    (new,) = plan.new_sequences
    assert bm.num_hashed_blocks(new.seq_id) == 0  # the caller sends the plan before it pays for the hashing
    scheduler.add_request(make_request("b", range(10, 19)))
    (hit,) = scheduler.schedule().new_sequences
    assert bm.num_hashed_blocks(new.seq_id) == 2
    assert (hit.block_ids[:2], hit.num_computed_tokens) == (new.block_ids[:2], 8)


def test_a_request_aborted_right_after_its_plan_leaves_its_blocks_in_the_prefix_cache() -> None:
    scheduler = make_scheduler(num_blocks=8)
    scheduler.add_request(make_request("a", range(10, 19)))
    (new,) = scheduler.schedule().new_sequences
    scheduler.abort_request("a")
    assert scheduler.block_manager.find_cached_prefix(list(range(10, 19))).block_ids == new.block_ids[:2]


def test_no_sequence_hits_blocks_computed_in_the_same_step() -> None:
    scheduler = make_scheduler(num_blocks=8)
    scheduler.add_request(make_request("a", range(10, 19)))
    scheduler.add_request(make_request("b", range(10, 19)))
    plan = scheduler.schedule()
    assert [(s.block_ids, s.num_computed_tokens) for s in plan.new_sequences] == [((0, 1, 2), 0), ((3, 4, 5), 0)]


@pytest.mark.parametrize("steps_in_flight", [1, 2, 4])
def test_requests_aborted_at_random_points_leave_no_blocks_and_no_worker_state(steps_in_flight: int) -> None:
    rng = random.Random(1234)
    scheduler = make_scheduler(num_blocks=40, block_size=4, max_num_batched_tokens=24, num_cpu_blocks=8,
                               preemption_mode=PreemptionMode.SWAP)
    worker = make_worker(scheduler)
    requests = [
        make_request(f"r{i}", [rng.randrange(3, 50) for _ in range(rng.randrange(1, 30))],
                     max_tokens=40, arrival_time_s=float(i), n=rng.choice([1, 1, 2]))
        for i in range(200)
    ]
    for request in requests:
        scheduler.add_request(request)
    stages: dict[str, int] = {"waiting": 0, "prefill": 0, "decode": 0}
    pending = list(requests)
    rng.shuffle(pending)

    def abort_some(index: int, plan: StepPlan) -> None:
        for _ in range(rng.randrange(0, 4)):
            if pending:
                request = pending.pop()
                if request.status is RequestStatus.WAITING:
                    stages["waiting"] += 1
                elif not request.is_prompt_done:
                    stages["prefill"] += 1
                else:
                    stages["decode"] += 1
                scheduler.abort_request(request.request_id)
        assert_scheduler_invariants(scheduler)

    result = run(scheduler, worker, steps_in_flight=steps_in_flight, on_step=abort_some)
    assert all(count > 0 for count in stages.values()), stages
    worker.execute(scheduler.schedule())
    assert (scheduler.stats.num_running, scheduler.stats.num_waiting, scheduler.stats.num_swapped) == (0, 0, 0)
    assert (scheduler.stats.num_used_blocks, scheduler.block_manager.cpu.num_used_blocks) == (0, 0)
    assert worker.seqs == {}
    assert all(reason is not FinishReason.ABORT for reason in result.finish_reasons.values())


def test_abort_frees_blocks_at_once_and_drops_the_sequence_in_the_next_plan() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 16)))
    step_once(scheduler, worker)
    scheduler.abort_request("a")
    scheduler.abort_request("unknown")
    assert (scheduler.stats.num_used_blocks, scheduler.has_unfinished_requests()) == (0, False)
    assert scheduler.get_request("a") is None
    plan, deltas = step_once(scheduler, worker)
    assert (plan.dropped_seq_ids, plan.scheduled_sequences, deltas) == ((0,), (), [])


def test_finished_sequence_frees_its_blocks_and_is_dropped() -> None:
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 16)))
    step_once(scheduler, worker)
    scheduler.finish_sequence("a", 0, FinishReason.STOP)
    assert scheduler.stats.num_used_blocks == 0
    assert scheduler.schedule().dropped_seq_ids == (0,)


def _aborted_after_one_step() -> tuple[Scheduler, FakeWorker]:
    """A scheduler whose one request (sequence 0) ran a step on the worker and was then aborted."""
    scheduler = make_scheduler(num_blocks=8)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 16)))
    step_once(scheduler, worker)
    scheduler.abort_request("a")
    return scheduler, worker


def test_drops_held_back_from_a_plan_of_their_own_ride_with_the_next_plan_that_has_work() -> None:
    scheduler, worker = _aborted_after_one_step()

    held = scheduler.schedule(drops_alone=False)
    assert held.is_empty and scheduler.has_pending_drops
    scheduler.add_request(make_request("b", range(20, 24)))
    carried = scheduler.schedule(drops_alone=False)

    assert not scheduler.has_pending_drops
    assert (held.step_id, carried.step_id) == (1, 1)  # the held-back plan took no step id
    assert carried.dropped_seq_ids == (0,) and [new.seq_id for new in carried.new_sequences] == [1]
    worker.execute(carried)
    assert list(worker.seqs) == [1]


def test_a_plan_of_drops_alone_goes_when_asked_for() -> None:
    scheduler, _ = _aborted_after_one_step()
    assert scheduler.schedule(drops_alone=False).is_empty and scheduler.has_pending_drops

    plan = scheduler.schedule()

    assert (plan.dropped_seq_ids, plan.new_sequences, plan.scheduled_sequences) == ((0,), (), ())
    assert not scheduler.has_pending_drops


def _run_with_tokens(next_token: TokenFn, **params: Any) -> tuple[list[int], FinishReason, int | None]:
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("a", [5, 6, 7], **params))
    result = run(scheduler, make_worker(scheduler, next_token))
    return result.tokens[("a", 0)], result.finish_reasons[("a", 0)], result.deltas[-1].stop_token_id


def test_eos_finishes_with_stop_and_keeps_the_token() -> None:
    result = _run_with_tokens(lambda tokens, index: EOS if len(tokens) == 5 else 9)
    assert result == ([9, 9, EOS], FinishReason.STOP, EOS)


def test_eos_before_min_tokens_does_not_stop() -> None:
    assert _run_with_tokens(lambda tokens, index: EOS, min_tokens=2) == ([EOS, EOS], FinishReason.STOP, EOS)


def test_stop_token_id_finishes_with_stop() -> None:
    assert _run_with_tokens(lambda tokens, index: 44, stop_token_ids=(44,)) == ([44], FinishReason.STOP, 44)


def test_ignore_eos_runs_to_max_tokens() -> None:
    assert _run_with_tokens(lambda tokens, index: EOS, ignore_eos=True, max_tokens=3) == (
        [EOS] * 3, FinishReason.LENGTH, None)


def test_max_model_len_finishes_with_length() -> None:
    scheduler = make_scheduler(num_blocks=16, max_model_len=6)
    scheduler.add_request(make_request("a", [5, 6, 7], max_tokens=None))
    result = run(scheduler, make_worker(scheduler))
    assert (len(result.tokens[("a", 0)]), result.finish_reasons[("a", 0)]) == (3, FinishReason.LENGTH)


def test_sequence_ends_with_length_before_it_outgrows_the_pool() -> None:
    scheduler = make_scheduler(num_blocks=2)
    scheduler.add_request(make_request("a", range(10, 16), max_tokens=10))
    result = run(scheduler, make_worker(scheduler))
    # 8 slots hold the KV of 8 tokens; the 9th is sampled but never needs a slot.
    assert (len(result.tokens[("a", 0)]), result.finish_reasons[("a", 0)]) == (3, FinishReason.LENGTH)
    assert scheduler.stats.num_used_blocks == 0


def test_add_request_rejects_what_can_never_run() -> None:
    scheduler = make_scheduler(num_blocks=2, max_model_len=16, max_num_waiting=1, max_num_seqs=2)
    with pytest.raises(NeverFitsError, match="a prompt of 9 tokens needs 3 KV blocks of 4 tokens, .* pool has 2"):
        scheduler.add_request(make_request("big", range(9)))
    with pytest.raises(InvalidArgumentError, match="17 tokens exceed max_model_len 16"):
        scheduler.add_request(make_request("long", range(17)))
    with pytest.raises(ResourceExhaustedError, match="n=3 sequences exceed max_num_seqs 2"):
        scheduler.add_request(make_request("wide", range(3), n=3))
    scheduler.add_request(make_request("ok", range(3)))
    with pytest.raises(ResourceExhaustedError, match="waiting queue is full"):
        scheduler.add_request(make_request("more", range(3)))
    assert scheduler.stats.num_waiting == 1


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_in_whole() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8, max_model_len=8,
                               enable_chunked_prefill=False)
    for request in make_requests(2, prompt_len=5, max_tokens=2):
        scheduler.add_request(request)
    plan = scheduler.schedule()
    assert [(s.seq_id, s.num_scheduled_tokens) for s in plan.new_sequences] == [(0, 5)]
