"""Exact schedules under preemption (priority, recompute, swap) and with n > 1 sequences sharing blocks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog.testing

from pagedserve.contract.step import BlockTableUpdate, ScheduledSequence
from pagedserve.control_plane.config import PreemptionMode, SchedulingPolicy
from pagedserve.control_plane.scheduling.request import RequestStatus
from pagedserve.control_plane.scheduling.scheduler import Scheduler

from .factories import (
    FakeWorker,
    assert_scheduler_invariants,
    default_next_token,
    make_request,
    make_requests,
    make_scheduler,
    make_worker,
    run,
    step_once,
)


def _status(scheduler: Scheduler, request_id: str) -> RequestStatus:
    request = scheduler.get_request(request_id)
    assert request is not None
    return request.status


def _alone_tokens(prompt: tuple[int, ...], max_tokens: int, **params: Any) -> list[int]:
    scheduler = make_scheduler(num_blocks=64)
    scheduler.add_request(make_request("alone", prompt, max_tokens=max_tokens, **params))
    return run(scheduler, make_worker(scheduler)).tokens[("alone", 0)]


def test_waiting_request_of_higher_priority_preempts_the_lowest_priority_running_one() -> None:
    scheduler = make_scheduler(num_blocks=4, policy=SchedulingPolicy.PRIORITY)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("low", range(10, 22), priority=5))
    step_once(scheduler, worker)
    scheduler.add_request(make_request("high", range(30, 38), priority=0))
    plan = scheduler.schedule()
    assert plan.dropped_seq_ids == (0,)
    # The preempted request's blocks join the free queue tail first: 3, then 2, 1, 0.
    assert [(s.seq_id, s.block_ids) for s in plan.new_sequences] == [(1, (3, 2))]
    assert _status(scheduler, "low") is RequestStatus.PREEMPTED
    assert scheduler.stats.num_preemptions == 1


def test_same_priority_waiting_request_does_not_preempt() -> None:
    scheduler = make_scheduler(num_blocks=4, policy=SchedulingPolicy.PRIORITY)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("first", range(10, 22), priority=1))
    step_once(scheduler, worker)
    scheduler.add_request(make_request("second", range(30, 38), priority=1))
    plan = scheduler.schedule()
    assert (plan.dropped_seq_ids, plan.new_sequences) == ((), ())
    assert plan.scheduled_sequences == (ScheduledSequence(0, 1, (BlockTableUpdate(3, (3,)),)),)


def _three_growing_requests(**scheduler_fields: Any) -> tuple[Scheduler, FakeWorker]:
    scheduler = make_scheduler(num_blocks=8, **scheduler_fields)
    for request in make_requests(3, prompt_len=6, max_tokens=8):
        scheduler.add_request(request)
    return scheduler, make_worker(scheduler)


def test_out_of_blocks_preempts_the_newest_request_which_resumes_with_the_same_tokens() -> None:
    scheduler, worker = _three_growing_requests()
    result = run(scheduler, worker, on_step=lambda i, plan: assert_scheduler_invariants(scheduler))
    preempting = [i for i, plan in enumerate(result.plans) if plan.dropped_seq_ids]
    # Step 3 computes slot 8 of each: r0 and r1 take the last two blocks, r2 (the newest) is preempted.
    assert preempting[0] == 3
    plan = result.plans[3]
    assert plan.dropped_seq_ids == (2,)
    assert plan.scheduled_sequences == (
        ScheduledSequence(0, 1, (BlockTableUpdate(2, (6,)),)),
        ScheduledSequence(1, 1, (BlockTableUpdate(2, (7,)),)),
    )
    resumed = next(p.new_sequences[0] for p in result.plans if p.new_sequences and p.new_sequences[0].seq_id == 3)
    assert resumed.output_token_ids == tuple(result.tokens[("r2", 0)][:3])
    for request in make_requests(3, prompt_len=6, max_tokens=8):
        assert result.tokens[(request.request_id, 0)] == _alone_tokens(request.prompt_token_ids, 8)
    assert scheduler.stats.num_preemptions == 1
    assert scheduler.stats.num_used_blocks == 0


def test_a_request_resumed_after_its_prompt_was_done_no_longer_asks_for_prompt_logprobs() -> None:
    scheduler = make_scheduler(num_blocks=8)
    for request in make_requests(3, prompt_len=6, max_tokens=8, prompt_logprobs=1):
        scheduler.add_request(request)
    result = run(scheduler, make_worker(scheduler))
    # r2 (sequence 2) is preempted by recompute in step 3, after its prefill, and resumes as sequence 3.
    sent = {s.seq_id: s for p in result.plans for s in p.new_sequences}
    first, resumed = sent[2], sent[3]
    assert (first.sampling_params.prompt_logprobs, resumed.sampling_params.prompt_logprobs) == (1, None)
    assert resumed.sampling_params == replace(first.sampling_params, prompt_logprobs=None)


def test_swap_mode_moves_the_newest_request_to_cpu_blocks_and_back() -> None:
    scheduler, worker = _three_growing_requests(num_cpu_blocks=4, preemption_mode=PreemptionMode.SWAP)
    result = run(scheduler, worker, on_step=lambda i, plan: assert_scheduler_invariants(scheduler))
    # Step 3: r2's two full blocks go to CPU blocks 0 and 1; its device blocks free up, tail first.
    assert [(i, p.swap_out) for i, p in enumerate(result.plans) if p.swap_out] == [(3, ((4, 0), (5, 1)))]
    assert result.plans[3].dropped_seq_ids == ()
    # Steps 4-7: r0 and r1 take blocks 5 and 4 and finish; freed tail first, the queue is 5 6 1 0 4 7 3 2.
    # Step 8: r2 comes back into 5 and 6, and takes 1 for slot 8.
    assert [(i, p.swap_in) for i, p in enumerate(result.plans) if p.swap_in] == [(8, ((0, 5), (1, 6)))]
    assert result.plans[8].dropped_seq_ids == (0, 1)
    assert result.plans[8].scheduled_sequences == (ScheduledSequence(2, 1, (BlockTableUpdate(0, (5, 6, 1)),)),)
    assert result.tokens[("r2", 0)] == _alone_tokens(make_requests(3, 6)[2].prompt_token_ids, 8)
    assert scheduler.stats.num_preemptions == 1
    assert (scheduler.block_manager.cpu.num_used_blocks, scheduler.stats.num_used_blocks) == (0, 0)


def test_swap_mode_falls_back_to_recompute_when_the_cpu_pool_is_full() -> None:
    scheduler, worker = _three_growing_requests(num_cpu_blocks=1, preemption_mode=PreemptionMode.SWAP)
    result = run(scheduler, worker)
    assert [p.swap_out for p in result.plans if p.swap_out] == []
    assert result.plans[3].dropped_seq_ids == (2,)


def test_parallel_samples_share_prompt_blocks_and_copy_the_partial_last_block_on_write() -> None:
    scheduler = make_scheduler(num_blocks=16)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("n4", range(10, 16), max_tokens=3, n=4))
    first, deltas = step_once(scheduler, worker)
    (new,) = first.new_sequences
    assert (new.seq_id, new.block_ids, new.fork_seq_ids, new.num_scheduled_tokens) == (0, (0, 1), (1, 2, 3), 6)
    assert [(d.completion_index, len(d.new_token_ids)) for d in deltas] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    bm = scheduler.block_manager
    assert [bm.block_ids(seq_id) for seq_id in range(4)] == [(0, 1)] * 4
    assert (bm.gpu.ref_count(0), bm.gpu.ref_count(1)) == (4, 4)
    second, second_deltas = step_once(scheduler, worker)
    assert second.block_copies == ((1, 2), (1, 3), (1, 4))
    assert second.scheduled_sequences == (
        ScheduledSequence(0, 1, (BlockTableUpdate(1, (2,)),)),
        ScheduledSequence(1, 1, (BlockTableUpdate(1, (3,)),)),
        ScheduledSequence(2, 1, (BlockTableUpdate(1, (4,)),)),
        ScheduledSequence(3, 1),
    )
    assert (bm.gpu.ref_count(0), bm.gpu.ref_count(1)) == (4, 1)
    result = run(scheduler, worker)
    prompt = tuple(range(10, 16))
    for index in range(4):
        tokens = [d.new_token_ids[0] for d in deltas + second_deltas + result.deltas if d.completion_index == index]
        expected = list(prompt)
        for _ in range(3):
            expected.append(default_next_token(expected, index))
        assert tokens == expected[6:]
    assert bm.gpu.num_used_blocks == 0


def test_wide_request_alone_recomputes_a_sibling_once_its_sequences_outgrow_the_pool() -> None:
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("n2", range(10, 16), max_tokens=10, n=2))
    result = run(scheduler, make_worker(scheduler), on_step=lambda i, plan: assert_scheduler_invariants(scheduler))
    # Step 3 computes slot 8 of both siblings: one free block is left, so sibling 1 (seq 1) waits.
    assert result.plans[3].dropped_seq_ids == (1,)
    assert result.plans[3].scheduled_sequences == (ScheduledSequence(0, 1, (BlockTableUpdate(2, (3,)),)),)
    resumed = [s for p in result.plans for s in p.new_sequences if s.seq_id == 2]
    assert [(s.sample_index, s.output_token_ids) for s in resumed] == [(1, tuple(result.tokens[("n2", 1)][:3]))]
    for index in range(2):
        expected = list(range(10, 16))
        for _ in range(10):
            expected.append(default_next_token(expected, index))
        assert result.tokens[("n2", index)] == expected[6:]
    assert scheduler.stats.num_preemptions == 1


def test_priority_policy_serves_higher_priority_first_so_the_lower_one_is_preempted() -> None:
    scheduler = make_scheduler(num_blocks=5, policy=SchedulingPolicy.PRIORITY)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("low", range(10, 16), priority=5))
    step_once(scheduler, worker)
    scheduler.add_request(make_request("high", range(30, 37), priority=0, arrival_time_s=1.0))
    step_once(scheduler, worker)
    step_once(scheduler, worker)
    # Step 3 computes slot 8 of both, admitted low first; the one free block goes to high.
    plan, _ = step_once(scheduler, worker)
    assert plan.dropped_seq_ids == (0,)
    assert plan.scheduled_sequences == (ScheduledSequence(1, 1, (BlockTableUpdate(2, (4,)),)),)
    assert _status(scheduler, "low") is RequestStatus.PREEMPTED


def test_first_preemption_logs_a_warning_with_the_cumulative_count() -> None:
    scheduler, worker = _three_growing_requests()
    with structlog.testing.capture_logs() as logs:
        run(scheduler, worker)
    (event,) = [e for e in logs if e["event"] == "request_preempted"]
    assert (event["log_level"], event["request_id"], event["mode"]) == ("warning", "r2", "RECOMPUTE")
    assert event["total_cumulative_preemption_cnt"] == 1
    assert event["message"].startswith("Request r2 was preempted by PreemptionMode.RECOMPUTE because")
