"""The engine: admits requests to worker lanes, applies each step's results, streams the outputs, and fails a
lane's requests fast when the lane dies."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import structlog

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.lane import Lane, StepTimes, StepTransport
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import EngineOutput, RequestFailed, StreamItem, Usage
from pagedserve.control_plane.engine.status import (
    RECENT_STEPS,
    EngineStatus,
    RetiredCounters,
    StepRecord,
    WorkerStatus,
    sum_status,
)
from pagedserve.control_plane.engine.tracked_request import TokenGaps, TrackedRequest
from pagedserve.control_plane.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PagedServeError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.fit import blocks_for, never_fits_error
from pagedserve.control_plane.scheduling.kv_events import KvEventLog
from pagedserve.control_plane.scheduling.request import FinishReason, Request, SequenceDelta
from pagedserve.control_plane.scheduling.scheduler import Scheduler, SchedulerStats
from pagedserve.control_plane.text.completion import CompletionStream
from pagedserve.control_plane.text.tokenizer import Tokenizer

# The plain output and status types are re-exported: callers (clients/llm.py) import them from here.
__all__ = [
    "RECENT_STEPS", "Engine", "EngineOutput", "EngineStatus", "LaneDeadCallback", "RequestFailed", "StepRecord",
    "StepTransport", "StreamItem", "Usage",
]

log = structlog.get_logger()

# Called on the loop with the worker's id and the cause each time a lane dies.
LaneDeadCallback = Callable[[str, BaseException], None]


class Engine:
    """Owns every admitted request until its stream ends. Each worker lane keeps up to
    config.max_steps_in_flight steps outstanding: steps N+1 onwards are planned while the worker runs step N.

    A lane dies when anything in it fails: its worker (WorkerUnavailableError), a step unanswered for
    config.step_timeout_s (a hung worker), or any other exception (logged with its traceback; its requests fail
    as INTERNAL). Then at once its requests end with that error, its scheduler is replaced by an empty one of
    the same size (every block and count released), its transport is closed and the on_lane_dead callbacks run.
    New requests go only to live lanes; revive_lane() puts a restarted worker back. No lane task ends silently.
    is_serving: some lane is alive and the engine is not draining.
    """

    def __init__(
        self,
        workers: Sequence[tuple[str, Scheduler, StepTransport]],
        tokenizer: Tokenizer,
        config: EngineConfig,
        metrics: EngineMetrics,
    ) -> None:
        self._config = config
        self._times = StepTimes()
        self._lanes = [Lane(worker_id, scheduler, transport, config, self._times)
                       for worker_id, scheduler, transport in workers]
        self._tokenizer = tokenizer
        self.metrics = metrics
        metrics.bind_workers(self.worker_status)
        self._requests: dict[str, TrackedRequest] = {}
        self._ids = itertools.count()
        self._num_steps = 0
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)
        self._retired = {lane.worker_id: RetiredCounters() for lane in self._lanes}  # counters of dead lanes
        self._lane_dead_callbacks: list[LaneDeadCallback] = []
        self._is_draining = False
        self._is_stopping = False
        self._was_serving = bool(self._lanes)
        self._health_changed = asyncio.Event()
        self._drained: asyncio.Event | None = None  # set when the last request ends, while drain() waits
        self._closing: set[asyncio.Task[None]] = set()  # transports of dead lanes being closed
        self._kv_events: KvEventLog | None = None

    def start(self) -> None:
        for lane in self._lanes:
            self._start_lane(lane)

    async def stop(self) -> None:
        """Cancels every lane's loop (silently: this is no failure)."""
        self._is_stopping = True
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)

    @property
    def is_serving(self) -> bool:
        """True iff some lane is alive and the engine is not draining: a request added now would be served."""
        return not self._is_draining and any(lane.is_alive for lane in self._lanes)

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks of every worker's pool as it is now (a restarted worker may come back with another size; a
        dead one counts with its last)."""
        return sum(lane.scheduler.block_manager.gpu.num_blocks for lane in self._lanes)

    def health_changed(self) -> asyncio.Event:
        """An event set at the next change of is_serving; call again after it fired for the one after."""
        return self._health_changed

    def publish_kv_events(self, events: KvEventLog) -> None:
        """Reports every lane's prefix-cache changes to events from now on (a lane's index is its place in the
        workers given at construction), those of schedulers that replace a dead lane's included."""
        self._kv_events = events
        for lane in self._lanes:
            self._observe_cache(lane)

    def _observe_cache(self, lane: Lane) -> None:
        if self._kv_events is not None:
            lane.scheduler.block_manager.gpu.observer = self._kv_events.lane(self._lanes.index(lane))

    def on_lane_dead(self, callback: LaneDeadCallback) -> None:
        """Registers callback(worker_id, cause), called on the loop each time a lane dies, after its requests
        failed and its blocks were released. An exception in it is logged and ignored."""
        self._lane_dead_callbacks.append(callback)

    def revive_lane(self, worker_id: str, transport: StepTransport, scheduler: Scheduler) -> None:
        """Puts a restarted worker back into service: a new lane with this transport and scheduler (sized for the
        worker as it is now) replaces worker_id's dead lane and starts its loop; is_serving turns True unless the
        engine drains. ValueError if no lane has that id or it is still alive."""
        index = next((i for i, lane in enumerate(self._lanes) if lane.worker_id == worker_id), None)
        if index is None:
            raise ValueError(f"worker_id: no lane has id {worker_id!r}")
        dead = self._lanes[index]
        if dead.is_alive:
            raise ValueError(f"worker_id: the lane of {worker_id!r} is alive")
        self._retired[worker_id].add(dead.scheduler.stats)
        lane = self._lanes[index] = Lane(worker_id, scheduler, transport, self._config, self._times)
        self._observe_cache(lane)
        self._start_lane(lane)
        num_blocks, max_model_len = scheduler.block_manager.gpu.num_blocks, scheduler.config.max_model_len
        log.info("lane_revived", worker_id=worker_id, num_gpu_blocks=num_blocks)
        if max_model_len is not None and blocks_for(max_model_len, scheduler.cache_config.block_size) > num_blocks:
            log.warning("revived_pool_below_max_model_len", worker_id=worker_id, num_gpu_blocks=num_blocks,
                        max_model_len=max_model_len, message="the restarted worker's KV pool cannot hold one sequence "
                        "of max_model_len tokens: requests go to other workers when theirs hold them to their end, "
                        "and one whose prompt no pool holds is refused")
        self._notify_health()

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting (add_request raises WorkerUnavailableError "server is shutting down"), lets the requests
        in flight finish for up to timeout_s, then ends each one left as a finish does: a last chunk per open
        completion (finish reason ABORT), the request's very last one with usage, and its blocks freed."""
        if not self._is_draining:
            self._is_draining = True
            log.info("engine_draining", num_requests=len(self._requests), timeout_s=timeout_s)
            self._notify_health()
        if self._requests and timeout_s > 0:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                self._drained = None
        if self._requests:
            log.warning("requests_cut_by_drain", request_ids=list(self._requests))
        for tracked in list(self._requests.values()):
            self._end_now(tracked)

    def add_request(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        request_id: str = "",
        priority: int = 0,
        final_only: bool = False,
        outputs: ItemChannel[EngineOutput] | None = None,
    ) -> str:
        """Admits a validated request to the least loaded live worker whose pool can hold it; raises
        ResourceExhaustedError when full, NeverFitsError when no worker's pool can ever hold it,
        WorkerUnavailableError at once when no worker is alive or the engine drains, AlreadyExistsError when
        request_id names a request that has not ended (an empty one gets a new id).

        final_only: stream() still yields every chunk, but its consumer is woken only when the request ends
        (as vLLM's FINAL_ONLY output kind), which spares an offline caller a task switch per step and request.
        outputs: a channel shared by many requests, whose one consumer is woken once per step for all of them
        (the frontend's relay), instead of the request's own channel that stream() reads.
        """
        if self._is_draining:
            raise WorkerUnavailableError("server is shutting down")
        live = [lane for lane in self._lanes if lane.is_alive]
        if not live:
            raise WorkerUnavailableError(f"no worker is serving (all {len(self._lanes)} failed)")
        if request_id in self._requests:
            raise AlreadyExistsError(f"request_id: {request_id!r} is in use by a request that has not ended")
        while not request_id or request_id in self._requests:
            request_id = f"req-{next(self._ids)}"
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_ids=self._tokenizer.eos_token_ids,
            arrival_time_s=time.monotonic(),
            priority=priority,
        )
        lane = min(self._lanes_holding(request, live), key=lambda candidate: _load(candidate.scheduler.stats))
        lane.scheduler.add_request(request)
        self._requests[request_id] = TrackedRequest(
            request=request,
            lane=lane,
            final_only=final_only,
            channel=ItemChannel() if outputs is None else outputs,
            completions=[
                CompletionStream(request_id, index, self._tokenizer, prompt_token_ids, params, text_at_end=final_only)
                for index in range(params.n)
            ],
        )
        log.info("request_admitted", request_id=request_id, worker_id=lane.worker_id,
                 num_prompt_tokens=len(prompt_token_ids), n=params.n, max_tokens=params.max_tokens)
        lane.wakeup.set()
        return request_id

    def _lanes_holding(self, request: Request, live: list[Lane]) -> list[Lane]:
        """The live lanes whose pool holds the request to its end, else those whose pool can hold it at all
        (its sequences may then end by LENGTH when the pool is full). NeverFitsError when no lane's pool can,
        dead ones included (a restarted worker may come back with another pool, which revive_lane puts in its
        lane); WorkerUnavailableError when only dead lanes' pools can."""
        for can_hold in (Scheduler.can_hold_to_the_end, Scheduler.can_ever_hold):
            holding = [lane for lane in live if can_hold(lane.scheduler, request)]
            if holding:
                return holding
        if any(lane.scheduler.can_ever_hold(request) for lane in self._lanes):
            raise WorkerUnavailableError("no serving worker's KV pool holds the request; the workers whose pools "
                                         "do are down (retry later)")
        largest = max(self._lanes, key=lambda lane: lane.scheduler.block_manager.gpu.num_blocks).scheduler
        raise never_fits_error(request, largest.cache_config.block_size, largest.block_manager.gpu.num_blocks)

    async def stream(self, request_id: str) -> AsyncIterator[StreamItem]:
        """Yields the request's chunks until every completion finished. Leaving early aborts the request."""
        tracked = self._requests.get(request_id)
        if tracked is None:
            raise NotFoundError(f"request_id: unknown request {request_id!r}")
        try:
            while True:
                for item in await tracked.channel.take_all():
                    if isinstance(item, RequestFailed):
                        raise item.error
                    yield item
                    if item.usage is not None:
                        return
        finally:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request now and frees its blocks; a no-op once it has finished."""
        tracked = self._forget(request_id)
        if tracked is None:
            return
        if not tracked.is_finished:
            tracked.lane.scheduler.abort_request(request_id)
            tracked.lane.wakeup.set()
            log.info("request_aborted", request_id=request_id)
            self.metrics.request_aborted()

    def status(self) -> EngineStatus:
        return sum_status(self.worker_status(), self._num_steps, self._times)

    def worker_status(self) -> list[WorkerStatus]:
        """Each worker's lane, dead ones included, with the counters of its earlier lanes carried over."""
        return [
            WorkerStatus(lane.worker_id, lane.is_alive, self._retired[lane.worker_id].carried(lane.scheduler.stats),
                         lane.scheduler.cache_config, lane.scheduler.block_manager.cpu.num_blocks)
            for lane in self._lanes
        ]

    def recent_steps(self) -> list[StepRecord]:
        """The last RECENT_STEPS steps of every lane, in the order their results arrived (call it on the loop)."""
        return list(self._recent_steps)

    # Lanes: their loops, their results, their deaths.

    def _start_lane(self, lane: Lane) -> None:
        lane.task = asyncio.create_task(self._run_lane(lane), name=f"engine-{lane.worker_id}")
        lane.task.add_done_callback(functools.partial(self._lane_task_done, lane))

    async def _run_lane(self, lane: Lane) -> None:
        try:
            await lane.drive(functools.partial(self._on_result, lane))
        except Exception as exc:  # any failure ends the lane's requests, loudly: nothing may hang on it
            self._kill_lane(lane, exc)
            await lane.close_transport()

    def _lane_task_done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        """A lane's task ended: by stop(), after its lane died (which said why), or else: never silently."""
        if task.cancelled():
            if self._is_stopping or not lane.is_alive:
                return
            cause: BaseException = WorkerUnavailableError(f"the engine loop of worker {lane.worker_id} was cancelled")
        else:
            exc = task.exception()
            if not lane.is_alive:
                if exc is not None:
                    log.error("lane_cleanup_failed", worker_id=lane.worker_id, exc_info=exc)
                return
            cause = exc or RuntimeError(f"the engine loop of worker {lane.worker_id} returned")
        self._kill_lane(lane, cause)
        try:
            closing = asyncio.get_running_loop().create_task(lane.close_transport())
        except RuntimeError:  # the loop is closing: the transport goes with it
            return
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _kill_lane(self, lane: Lane, cause: BaseException) -> None:
        """Fails the lane's requests with the cause (WorkerUnavailableError as it is, anything else as INTERNAL,
        logged with its traceback), releases every block and count it held, and tells the callbacks."""
        if not lane.is_alive:
            return
        lane.is_alive = False
        request_ids = [request_id for request_id, tracked in self._requests.items() if tracked.lane is lane]
        error: PagedServeError
        if isinstance(cause, WorkerUnavailableError):
            error = cause
            log.error("worker_failed", worker_id=lane.worker_id, error=str(cause), request_ids=request_ids)
        else:
            error = PagedServeError(
                f"internal error in the engine (worker {lane.worker_id}): {type(cause).__name__}: {cause}"
            )
            log.error("lane_failed", worker_id=lane.worker_id, error=str(error), request_ids=request_ids,
                      exc_info=cause)
        for request_id in request_ids:
            self._fail(request_id, error)
        old = lane.scheduler
        self._retired[lane.worker_id].add(old.stats)
        lane.scheduler = Scheduler(old.config, old.cache_config, old.block_manager.gpu.num_blocks,
                                   old.block_manager.cpu.num_blocks)
        if self._kv_events is not None:
            self._kv_events.lane_cleared(self._lanes.index(lane))
        self._observe_cache(lane)
        self._notify_health()
        for callback in list(self._lane_dead_callbacks):
            try:
                callback(lane.worker_id, cause)
            except Exception:
                log.exception("lane_dead_callback_failed", worker_id=lane.worker_id)

    def _notify_health(self) -> None:
        event, self._health_changed = self._health_changed, asyncio.Event()
        event.set()
        is_serving = self.is_serving
        if is_serving != self._was_serving:
            self._was_serving = is_serving
            log.info("engine_health_changed", is_serving=is_serving,
                     num_live_workers=sum(lane.is_alive for lane in self._lanes), is_draining=self._is_draining)

    def _on_result(self, lane: Lane, plan: StepPlan, plan_ms: float, output: StepResult, counts_idle: bool) -> None:
        started = time.perf_counter()
        self._num_steps += 1
        self.metrics.observe_iteration(lane.worker_id, plan.num_scheduled_tokens)
        self._apply(lane, lane.scheduler.update_from_output(plan, output))
        apply_s = time.perf_counter() - started
        self._times.control_plane_s += apply_s
        self._times.add_output(output, counts_idle)
        self._recent_steps.append(StepRecord(
            plan.step_id, len(plan.new_sequences) + len(plan.scheduled_sequences), plan.num_scheduled_tokens,
            plan_ms, apply_s * 1e3, started, output.step_time_ms, output.forward_time_ms,
            output.idle_time_ms if counts_idle else 0.0,
        ))

    # Requests: their chunks and their ends.

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
                self._fail(delta.request_id, InvalidArgumentError(*delta.failure))
                continue
            completion = tracked.completions[delta.completion_index]
            if not completion.is_finished:  # tokens of a completion that a stop string ended are never streamed
                tracked.observe_tokens(len(delta.new_token_ids), gaps, self.metrics)
            chunk = completion.apply(delta)
            if completion.is_finished and delta.finish_reason is None:
                lane.scheduler.finish_sequence(delta.request_id, delta.completion_index, FinishReason.STOP)
            if chunk is None:
                continue
            usage = self._finish(tracked) if completion.is_finished and tracked.is_finished else None
            tracked.channel.put(StreamItem(chunk, usage), wake=usage is not None or not tracked.final_only)
        gaps.observe(self.metrics)

    def _fail(self, request_id: str, error: PagedServeError) -> None:
        """Ends the request's stream with the error; its blocks are freed by the caller, or were."""
        tracked = self._forget(request_id)
        if tracked is not None:
            tracked.channel.put(RequestFailed(request_id, error))

    def _end_now(self, tracked: TrackedRequest) -> None:
        """Ends a request as a finish does, every open completion with ABORT: a last chunk each, then usage."""
        tracked.lane.scheduler.abort_request(tracked.request.request_id)
        tracked.lane.wakeup.set()
        last = tracked.abort_open_completions()
        usage = self._finish(tracked)
        for i, chunk in enumerate(last):
            tracked.channel.put(StreamItem(chunk, usage if i == len(last) - 1 else None))

    def _finish(self, tracked: TrackedRequest) -> Usage:
        request = tracked.request
        self._forget(request.request_id)
        usage = tracked.usage()
        reasons = [c.finish_reason for c in tracked.completions]
        self.metrics.request_ended(reasons, tracked.record(time.monotonic()))
        log.info("request_finished", request_id=request.request_id,
                 finish_reasons=[r.name for r in reasons if r is not None],
                 num_completion_tokens=usage.completion_tokens)
        return usage

    def _forget(self, request_id: str) -> TrackedRequest | None:
        tracked = self._requests.pop(request_id, None)
        if self._drained is not None and not self._requests:
            self._drained.set()
        return tracked


def _load(stats: SchedulerStats) -> int:
    return stats.num_running + stats.num_waiting + stats.num_swapped
