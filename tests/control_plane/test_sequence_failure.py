"""A sequence the worker cannot go on with (its constraint does not compile there) ends its whole request as an abort
does: every block freed, its sequences dropped on the worker once, one delta carrying the failure, later results for
it ignored; the other requests of the same steps go on with the tokens they would have had alone."""

from __future__ import annotations

from pagedserve.contract.step import SequenceFailure, SequenceOutput, StepResult
from pagedserve.control_plane.scheduling.request import FinishReason

from .factories import assert_scheduler_invariants, make_request, make_scheduler, make_worker, run

FAILURE = SequenceFailure("structured_output", "cannot be compiled on the worker: unknown special token")


def _failed(result: StepResult, seq_id: int) -> StepResult:
    """The worker's result with seq_id's token replaced by the failure, as the worker reports it."""
    outputs = tuple(SequenceOutput(o.seq_id, None, failure=FAILURE) if o.seq_id == seq_id else o
                    for o in result.outputs)
    return StepResult(result.step_id, outputs, result.step_time_ms, result.forward_time_ms, result.idle_time_ms)


def _tokens_alone() -> list[int]:
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add_request(make_request("b", range(30, 37), max_tokens=6))
    return run(scheduler, make_worker(scheduler)).tokens[("b", 0)]


def test_a_failed_sequence_ends_its_request_at_once_and_the_others_go_on() -> None:
    scheduler = make_scheduler(num_blocks=16)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 17), max_tokens=6, n=3))
    scheduler.add_request(make_request("b", range(30, 37), max_tokens=6))
    first, second = scheduler.schedule(), scheduler.schedule()  # two steps in flight
    a_ids = [seq.seq_id for seq in scheduler._requests["a"].sequences]
    failed = _failed(worker.execute(first), a_ids[0])

    deltas = scheduler.update_from_output(first, failed)
    after_failure = (scheduler.get_request("a"), scheduler.block_manager.gpu.num_used_blocks)
    assert_scheduler_invariants(scheduler)
    late = scheduler.update_from_output(second, worker.execute(second))  # a's token of the next step is ignored
    rest = run(scheduler, worker)

    assert [(d.request_id, d.new_token_ids, d.finish_reason, d.failure) for d in deltas if d.request_id == "a"] == [
        ("a", (), FinishReason.ABORT, FAILURE)]
    assert after_failure == (None, 2)  # b's two blocks alone
    assert [d.request_id for d in late] == ["b"]
    assert rest.plans[0].dropped_seq_ids == tuple(a_ids)  # the parent and the siblings it forked, once
    assert all(not set(plan.dropped_seq_ids) & set(a_ids) for plan in rest.plans[1:])
    b_tokens = [t for d in deltas + late if d.request_id == "b" for t in d.new_token_ids] + rest.tokens[("b", 0)]
    assert b_tokens == _tokens_alone()
    assert scheduler.block_manager.gpu.num_free_blocks == scheduler.block_manager.gpu.num_blocks
    assert not scheduler.has_unfinished_requests()


def test_a_failure_of_a_request_that_ended_meanwhile_changes_nothing() -> None:
    scheduler = make_scheduler(num_blocks=16)
    worker = make_worker(scheduler)
    scheduler.add_request(make_request("a", range(10, 17), max_tokens=6))
    plan = scheduler.schedule()
    (seq,) = scheduler._requests["a"].sequences
    scheduler.abort_request("a")
    assert scheduler.update_from_output(plan, _failed(worker.execute(plan), seq.seq_id)) == []
    assert scheduler.block_manager.gpu.num_free_blocks == scheduler.block_manager.gpu.num_blocks
