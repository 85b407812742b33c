"""The requests of a failed worker that go on: moved to a live worker at once, or waiting for one to come back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.lane import Lane
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.request_table import RequestTable
from pagedserve.control_plane.engine.tracked_request import TrackedRequest
from pagedserve.control_plane.errors import WorkerUnavailableError

log = structlog.get_logger()


@dataclass(slots=True)
class _Waiting:
    failed_worker_id: str
    error: WorkerUnavailableError
    timer: asyncio.TimerHandle  # ends the wait after config.worker_failure_wait_s


class Failover:
    """Where each request of a lane whose worker failed goes (LaneSet asks rescue() for each).

    A request rides through at most config.worker_failure_retries failures. It moves to the least loaded live lane
    whose pool holds its sequences with their known tokens (Scheduler.can_resume), which computes them again
    (Scheduler.adopt); its stream goes on. With no such lane, and dead lanes being brought back (expect_revivals:
    a supervisor restarts workers), it waits for a revived lane that holds it (revived()) for up to
    config.worker_failure_wait_s, and ends with UNAVAILABLE when that passes or when no dead lane is left to wait
    for (give_up_waiting()). Otherwise rescue() returns False and the caller ends it.
    """

    def __init__(self, config: EngineConfig, requests: RequestTable, metrics: EngineMetrics) -> None:
        self._config = config
        self._requests = requests
        self._metrics = metrics
        self._revivals_expected = False
        self._waiting: dict[str, _Waiting] = {}  # request id -> its wait, in the order they began

    def expect_revivals(self) -> None:
        """Dead lanes are brought back from now on (or given up, see give_up_waiting): requests may wait."""
        self._revivals_expected = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def rescue(self, request_id: str, dead: Lane, live: list[Lane], error: WorkerUnavailableError) -> bool:
        """Moves the request of dead, whose worker failed with error, to a live lane, or has it wait for a revived
        one; False, changing nothing, when it cannot ride through this failure."""
        tracked = self._requests.get(request_id)
        if (tracked is None or tracked.request.is_finished
                or tracked.worker_failures >= self._config.worker_failure_retries):
            return False
        holding = _holding(tracked, live)
        if not holding and not self._revivals_expected:
            return False
        tracked.worker_failures += 1
        if holding:
            self._move(tracked, holding, dead.worker_id)
            self._metrics.request_resumed(waited=False)
            return True
        wait_s = self._config.worker_failure_wait_s
        timer = asyncio.get_running_loop().call_later(wait_s, self._end_wait, request_id,
                                                      f"no worker that holds it came back within {wait_s:g} s")
        self._waiting[request_id] = _Waiting(dead.worker_id, error, timer)
        log.warning("request_waits_for_a_worker", request_id=request_id, failed_worker_id=dead.worker_id,
                    wait_s=wait_s, worker_failures=tracked.worker_failures)
        return True

    def revived(self, lane: Lane) -> None:
        """A revived lane takes the waiting requests its pool holds, in the order they began to wait."""
        for request_id, waiting in list(self._waiting.items()):
            tracked = self._requests.get(request_id)  # None: aborted, or the engine drained, while it waited
            if tracked is None:
                self._forget(request_id)
            elif holding := _holding(tracked, [lane]):
                self._move(tracked, holding, waiting.failed_worker_id)
                self._forget(request_id)
                self._metrics.request_resumed(waited=True)

    def give_up_waiting(self, reason: str) -> None:
        """No dead lane is left to wait for: every waiting request ends with its worker's error and the reason."""
        for request_id in list(self._waiting):
            self._end_wait(request_id, reason)

    def stop(self) -> None:
        """Cancels the waits (the engine stops)."""
        for request_id in list(self._waiting):
            self._forget(request_id)

    def _move(self, tracked: TrackedRequest, holding: list[Lane], failed_worker_id: str) -> None:
        """Hands the request to the least loaded of the lanes that hold it."""
        lane = min(holding, key=lambda candidate: candidate.load)
        lane.scheduler.adopt(tracked.request)
        tracked.lane = lane
        lane.wakeup.set()
        log.warning("request_resumed", request_id=tracked.request.request_id,
                    failed_worker_id=failed_worker_id, worker_id=lane.worker_id,
                    worker_failures=tracked.worker_failures)

    def _end_wait(self, request_id: str, reason: str) -> None:
        waiting = self._forget(request_id)
        if waiting is not None:
            log.error("request_wait_for_a_worker_ended", request_id=request_id, reason=reason)
            self._requests.fail(request_id, WorkerUnavailableError(f"{waiting.error}; {reason}"))

    def _forget(self, request_id: str) -> _Waiting | None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            waiting.timer.cancel()
        return waiting


def _holding(tracked: TrackedRequest, lanes: list[Lane]) -> list[Lane]:
    """The lanes that can take the request over (Scheduler.can_resume)."""
    return [lane for lane in lanes if lane.scheduler.can_resume(tracked.request)]
