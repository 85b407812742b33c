"""One worker's lane: its scheduler, its step transport, and the loop that keeps its step pipeline full."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import structlog

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.scheduling.scheduler import Scheduler

log = structlog.get_logger()

_CLOSE_TIMEOUT_S = 5.0  # a transport that takes longer to close is left to the garbage collector
# How long the sequences that ended wait for a step with work to carry their drops before a step takes them alone: a
# lone drop is a round trip through the engine and the worker, which would compete with the next request's first
# step, arriving right behind it, for the host's cores and interpreter locks (docs/architecture.md, the step protocol).
LONE_DROPS_WAIT_S = 0.01


class StepTransport(Protocol):
    """Carries plans to one worker and its results back, in order."""

    async def send(self, plan: StepPlan) -> None: ...

    async def receive(self) -> StepResult: ...


@runtime_checkable
class _Closable(Protocol):
    async def close(self) -> None: ...


@runtime_checkable
class _Watchable(Protocol):
    async def wait_closed(self) -> str | None:
        """Returns when the worker's step stream ended, even while no step is in flight: why, if it failed."""


@dataclass(slots=True)
class StepTimes:
    """Where the time of the steps went, summed since start (seconds)."""

    control_plane_s: float = 0.0
    worker_step_s: float = 0.0
    worker_forward_s: float = 0.0
    worker_idle_s: float = 0.0

    def add_output(self, output: StepResult, counts_idle: bool) -> None:
        """counts_idle: the device's wait before this step was the pipeline's (not a wait for requests)."""
        self.worker_step_s += output.step_time_ms / 1e3
        self.worker_forward_s += output.forward_time_ms / 1e3
        if counts_idle:
            self.worker_idle_s += output.idle_time_ms / 1e3


class _InFlight(NamedTuple):
    plan: StepPlan
    plan_ms: float  # the scheduler's time on it
    sent_s: float  # loop.time() when it left


# (plan, plan_ms, result, counts_idle): applies one step's result; counts_idle as StepTimes.add_output's.
ResultHandler = Callable[[StepPlan, float, StepResult, bool], None]


class Lane:
    """One worker with its scheduler (the worker's global block tables) and its loop task.

    Invariants: while alive, the lane's task keeps up to max_steps_in_flight planned steps at the worker and
    hands their results over in order. A dead lane (is_alive False) admits nothing and its scheduler holds no
    request and no block; it stays dead until the engine replaces it with a new lane for the same worker.
    A watchdog bounds every wait on the worker by step_timeout_s: one timer, re-armed when it fires early, so
    a step costs no timer of its own.
    """

    def __init__(
        self, worker_id: str, scheduler: Scheduler, transport: StepTransport, config: EngineConfig, times: StepTimes,
    ) -> None:
        self.worker_id = worker_id
        self.scheduler = scheduler
        self.transport = transport
        self.wakeup = asyncio.Event()  # set when the scheduler got work while the lane was idle
        self.task: asyncio.Task[None] | None = None
        self.is_alive = True
        self._config = config
        self._times = times
        self._deadline_s: float | None = None  # loop.time() by which the transport call awaited now must return
        self._deadline_step_id = 0
        self._deadline_is_send = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._failure: WorkerUnavailableError | None = None  # why a watcher cancelled the task

    @property
    def load(self) -> int:
        """Requests on the lane's scheduler: running, waiting and swapped."""
        stats = self.scheduler.stats
        return stats.num_running + stats.num_waiting + stats.num_swapped

    async def drive(self, on_result: ResultHandler) -> None:
        """Runs until cancelled or until it raises: WorkerUnavailableError when the worker fails, or takes or
        answers no step for step_timeout_s (a hung worker); any other exception of the scheduler or of
        on_result as it is."""
        watcher = None
        if isinstance(self.transport, _Watchable):  # an idle lane notices a dead worker too
            watcher = asyncio.create_task(self._watch_closed(self.transport), name=f"watch-{self.worker_id}")
        try:
            await self._drive(on_result)
        except asyncio.CancelledError:
            if self._failure is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: this cancel is handled here
                task.uncancel()
            raise self._failure from None
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _drive(self, on_result: ResultHandler) -> None:
        loop = asyncio.get_running_loop()
        in_flight: deque[_InFlight] = deque()
        # The first step after the lane ran out of work: the device's wait before it was for work, not for us.
        first_after_pause: int | None = None
        is_paused = True
        last_result_s = 0.0  # loop.time() of the last result
        while True:
            if len(in_flight) < self._config.max_steps_in_flight:
                await self._fill(in_flight)
                if is_paused and in_flight:
                    first_after_pause, is_paused = in_flight[0].plan.step_id, False
            if not in_flight:
                self.wakeup.clear()
                if not await self._wait_for_work():
                    await self._fill(in_flight, drops_alone=True)
                is_paused = True
                continue
            # The worker starts the oldest step once it sent the previous result, so the wait counts from then.
            oldest = in_flight[0]
            self._watch(oldest.plan.step_id, max(oldest.sent_s, last_result_s), is_send=False)
            try:
                output = await self.transport.receive()
            finally:
                self._deadline_s = None
            last_result_s = loop.time()
            in_flight.popleft()
            on_result(oldest.plan, oldest.plan_ms, output, output.step_id != first_after_pause)
            # The result's chunks go to their streams (the relay's task, woken by on_result) before the next step is
            # planned and sent: a token reaches its client one planning and one send sooner.
            await asyncio.sleep(0)

    async def _wait_for_work(self) -> bool:
        """Waits until the scheduler has work (True); while ended sequences wait to be dropped, LONE_DROPS_WAIT_S at
        most (False: the wait ran out)."""
        if not self.scheduler.has_pending_drops:
            await self.wakeup.wait()
            return True
        try:
            await asyncio.wait_for(self.wakeup.wait(), LONE_DROPS_WAIT_S)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            return False
        return True

    async def _fill(self, in_flight: deque[_InFlight], drops_alone: bool = False) -> None:
        """Plans and sends steps until max_steps_in_flight are out or there is nothing to plan; drops_alone: a plan
        that only drops sequences is sent too (otherwise they wait for a plan with work)."""
        loop = asyncio.get_running_loop()
        while len(in_flight) < self._config.max_steps_in_flight:
            started = time.perf_counter()
            plan = self.scheduler.schedule(drops_alone)
            plan_s = time.perf_counter() - started
            self._times.control_plane_s += plan_s
            if plan.is_empty:
                return
            sent_s = loop.time()
            self._watch(plan.step_id, sent_s, is_send=True)  # a worker that stops reading blocks send()
            try:
                await self.transport.send(plan)
            finally:
                self._deadline_s = None
            in_flight.append(_InFlight(plan, plan_s * 1e3, sent_s))

    def _watch(self, step_id: int, since_s: float, is_send: bool) -> None:
        """Bounds the transport call about to be awaited to step_timeout_s from since_s (loop time)."""
        self._deadline_s = since_s + self._config.step_timeout_s
        self._deadline_step_id, self._deadline_is_send = step_id, is_send
        if self._watchdog is None or self._deadline_s < self._watchdog.when():
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = asyncio.get_running_loop().call_at(self._deadline_s, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._deadline_s is None or self.task is None or self.task.done():
            return  # nothing awaited now: the next wait re-arms the watchdog
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline_s:
            self._watchdog = loop.call_at(self._deadline_s, self._check_deadline)
            return
        action = "take" if self._deadline_is_send else "answer"
        self._fail(WorkerUnavailableError(
            f"worker {self.worker_id} did not {action} step {self._deadline_step_id} "
            f"within {self._config.step_timeout_s:g} s"
        ))

    async def _watch_closed(self, transport: _Watchable) -> None:
        failure = None
        try:
            failure = await transport.wait_closed()
        except Exception:
            log.exception("worker_watch_failed", worker_id=self.worker_id)
        self._fail(WorkerUnavailableError(failure or f"worker {self.worker_id} closed its step stream"))

    def _fail(self, error: WorkerUnavailableError) -> None:
        """Ends drive() from outside its task with error."""
        if self.task is not None and not self.task.done() and self._failure is None:
            self._failure = error
            self.task.cancel()

    async def close_transport(self) -> None:
        """Closes the transport if it has a close() (a gRPC worker client cancels its step stream, so the worker
        drops every sequence); never raises."""
        if not isinstance(self.transport, _Closable):
            return
        try:
            await asyncio.wait_for(self.transport.close(), _CLOSE_TIMEOUT_S)
        except Exception:
            log.exception("worker_close_failed", worker_id=self.worker_id)
