"""Applies each step's result: the scheduler's update, every request's new chunks on its stream, the step's record."""

from __future__ import annotations

import time
from collections import deque

import structlog

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.engine.lane import Lane, StepTimes
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import StreamItem
from pagedserve.control_plane.engine.request_table import RequestTable
from pagedserve.control_plane.engine.status import RECENT_STEPS, StepRecord
from pagedserve.control_plane.engine.tracked_request import TokenGaps
from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.scheduling.request import FinishReason, SequenceDelta

log = structlog.get_logger()


class ResultApplier:
    """Turns each lane's step results, on the loop as they arrive, into its requests' stream items, their metrics
    and the engine's step records.

    Invariants: num_steps counts every result applied; recent_steps() holds the last RECENT_STEPS of them in the
    order they arrived; a request ends (and leaves the table) with the chunk that finishes its last completion.
    """

    def __init__(self, requests: RequestTable, metrics: EngineMetrics, times: StepTimes) -> None:
        self._requests = requests
        self._metrics = metrics
        self._times = times
        self.num_steps = 0
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)

    def recent_steps(self) -> list[StepRecord]:
        """The last RECENT_STEPS steps of every lane, in the order their results arrived (call it on the loop)."""
        return list(self._recent_steps)

    def on_result(self, lane: Lane, plan: StepPlan, plan_ms: float, output: StepResult, counts_idle: bool) -> None:
        """Applies lane's result of plan; plan_ms and counts_idle as Lane.drive reports them."""
        started = time.perf_counter()
        self.num_steps += 1
        self._metrics.observe_iteration(lane.worker_id, plan.num_scheduled_tokens)
        self._apply(lane, lane.scheduler.update_from_output(plan, output))
        apply_s = time.perf_counter() - started
        self._times.control_plane_s += apply_s
        self._times.add_output(output, counts_idle)
        self._recent_steps.append(StepRecord(
            plan.step_id, len(plan.new_sequences) + len(plan.scheduled_sequences), plan.num_scheduled_tokens,
            plan_ms, apply_s * 1e3, started, output.step_time_ms, output.forward_time_ms,
            output.idle_time_ms if counts_idle else 0.0,
        ))

    def _apply(self, lane: Lane, deltas: list[SequenceDelta]) -> None:
        now = time.monotonic()
        gaps = TokenGaps(now)
        for delta in deltas:
            tracked = self._requests.get(delta.request_id)
            if tracked is None:
                continue
            if delta.failure is not None:  # the worker cannot honour a parameter; the scheduler ended the request
                log.warning("request_failed_on_worker", request_id=delta.request_id, worker_id=lane.worker_id,
                            field=delta.failure.field, error=delta.failure.message)
                self._requests.fail(delta.request_id, InvalidArgumentError(*delta.failure))
                continue
            completion = tracked.completions[delta.completion_index]
            if not completion.is_finished:  # tokens of a completion that a stop string ended are never streamed
                tracked.observe_tokens(len(delta.new_token_ids), gaps, self._metrics)
            chunk = completion.apply(delta)
            if completion.is_finished and delta.finish_reason is None:
                lane.scheduler.finish_sequence(delta.request_id, delta.completion_index, FinishReason.STOP)
            if chunk is None:
                continue
            usage = self._requests.finish(tracked) if completion.is_finished and tracked.is_finished else None
            tracked.channel.put(StreamItem(chunk, usage), wake=usage is not None or not tracked.final_only)
        gaps.observe(self._metrics)
