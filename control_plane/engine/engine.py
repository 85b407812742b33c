"""The engine: admits requests to worker lanes, streams their outputs, drains, and says whether it serves."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence

import structlog

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.lane import Lane, StepTimes, StepTransport
from pagedserve.control_plane.engine.lane_set import LaneDeadCallback, LaneSet
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import EngineOutput, RequestFailed, StreamItem, Usage
from pagedserve.control_plane.engine.request_table import RequestTable
from pagedserve.control_plane.engine.result_applier import ResultApplier
from pagedserve.control_plane.engine.status import RECENT_STEPS, EngineStatus, StepRecord, WorkerStatus, sum_status
from pagedserve.control_plane.engine.tracked_request import TrackedRequest
from pagedserve.control_plane.errors import AlreadyExistsError, NotFoundError, WorkerUnavailableError
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.fit import never_fits_error
from pagedserve.control_plane.scheduling.kv_events import KvEventLog
from pagedserve.control_plane.scheduling.request import Request
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.text.completion import CompletionStream
from pagedserve.control_plane.text.tokenizer import Tokenizer

# The plain output and status types are re-exported: callers (clients/llm.py) import them from here.
__all__ = [
    "RECENT_STEPS", "Engine", "EngineOutput", "EngineStatus", "RequestFailed", "StepRecord", "StepTransport",
    "StreamItem", "Usage",
]

log = structlog.get_logger()


class Engine:
    """Owns every admitted request until its stream ends. Each worker lane keeps up to
    config.max_steps_in_flight steps outstanding: steps N+1 onwards are planned while the worker runs step N.

    Its parts: the lanes through their lives (LaneSet: a lane that fails ends its requests at once and releases
    its blocks), the admitted requests and their ends (RequestTable), each step's result applied to them
    (ResultApplier). New requests go only to live lanes; revive_lane() puts a restarted worker back.
    is_serving: some lane is alive and the engine is not draining.
    """

    def __init__(
        self,
        workers: Sequence[tuple[str, Scheduler, StepTransport]],
        tokenizer: Tokenizer,
        config: EngineConfig,
        metrics: EngineMetrics,
    ) -> None:
        self._times = StepTimes()
        self._requests = RequestTable(metrics, config.log_requests)
        self._results = ResultApplier(self._requests, metrics, self._times)
        self._lane_set = LaneSet(workers, config, self._times, self._requests, metrics, self._results.on_result,
                                 self._notify_health)
        self._tokenizer = tokenizer
        self.metrics = metrics
        metrics.bind_workers(self.worker_status)
        self._ids = itertools.count()
        self._is_draining = False
        self._was_serving = bool(self._lane_set.lanes)
        self._health_changed = asyncio.Event()

    def start(self) -> None:
        self._lane_set.start()

    async def stop(self) -> None:
        """Cancels every lane's loop (silently: this is no failure)."""
        await self._lane_set.stop()

    @property
    def is_serving(self) -> bool:
        """True iff some lane is alive and the engine is not draining: a request added now would be served."""
        return not self._is_draining and any(lane.is_alive for lane in self._lane_set.lanes)

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks of every worker's pool as it is now (a restarted worker may come back with another size; a
        dead one counts with its last)."""
        return self._lane_set.num_gpu_blocks

    def health_changed(self) -> asyncio.Event:
        """An event set at the next change of is_serving; call again after it fired for the one after."""
        return self._health_changed

    def publish_kv_events(self, events: KvEventLog) -> None:
        """Reports every lane's prefix-cache changes to events from now on (a lane's index is its place in the
        workers given at construction), those of schedulers that replace a dead lane's included."""
        self._lane_set.publish_kv_events(events)

    def on_lane_dead(self, callback: LaneDeadCallback) -> None:
        """Registers callback(worker_id, cause), called on the loop each time a lane dies, after its requests
        failed and its blocks were released. An exception in it is logged and ignored."""
        self._lane_set.on_lane_dead(callback)

    def expect_revivals(self) -> None:
        """Dead lanes are revived from now on (revive_lane) or abandoned (abandon_lane): a request whose worker
        failed with no live worker holding it waits up to EngineConfig.worker_failure_wait_s for a revived one."""
        self._lane_set.expect_revivals()

    def abandon_lane(self, worker_id: str) -> None:
        """worker_id's dead lane will not be revived; once none is left to wait for, the waiting requests end with
        UNAVAILABLE. ValueError if no dead lane has that id."""
        self._lane_set.abandon(worker_id)

    def revive_lane(self, worker_id: str, transport: StepTransport, scheduler: Scheduler) -> None:
        """Puts a restarted worker back into service: a new lane with this transport and scheduler (sized for the
        worker as it is now) replaces worker_id's dead lane and starts its loop; is_serving turns True unless the
        engine drains. ValueError if no lane has that id or it is still alive."""
        self._lane_set.revive(worker_id, transport, scheduler)

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting (add_request raises WorkerUnavailableError "server is shutting down"), lets the requests
        in flight finish for up to timeout_s, then ends each one left as a finish does: a last chunk per open
        completion (finish reason ABORT), the request's very last one with usage, and its blocks freed."""
        if not self._is_draining:
            self._is_draining = True
            log.info("engine_draining", num_requests=len(self._requests), timeout_s=timeout_s)
            self._notify_health()
        await self._requests.wait_until_empty(timeout_s)
        if self._requests:
            log.warning("requests_cut_by_drain", request_ids=self._requests.ids())
        self._requests.end_all_now()

    def add_request(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        request_id: str = "",
        priority: int = 0,
        final_only: bool = False,
        outputs: ItemChannel[EngineOutput] | None = None,
        arrival_time_s: float | None = None,
    ) -> str:
        """Admits a validated request to the least loaded live worker whose pool can hold it; raises
        ResourceExhaustedError when full, NeverFitsError when no worker's pool can ever hold it,
        WorkerUnavailableError at once when no worker is alive or the engine drains, AlreadyExistsError when
        request_id names a request that has not ended (an empty one gets a new id).

        final_only: stream() still yields every chunk, but its consumer is woken only when the request ends
        (as vLLM's FINAL_ONLY output kind), which spares an offline caller a task switch per step and request.
        outputs: a channel shared by many requests, whose one consumer is woken once per step for all of them
        (the frontend's relay), instead of the request's own channel that stream() reads.
        arrival_time_s: when the request reached the server (time.monotonic(), in this or another process of the
        host: the start of the frontend's handler), from which its latencies count and by which the priority policy
        breaks ties; None: now. A time after now, or one that is not a positive number, counts as now.
        """
        if self._is_draining:
            raise WorkerUnavailableError("server is shutting down")
        live = self._lane_set.live()
        if not live:
            raise WorkerUnavailableError(f"no worker is serving (all {len(self._lane_set.lanes)} failed)")
        if request_id in self._requests:
            raise AlreadyExistsError(f"request_id: {request_id!r} is in use by a request that has not ended")
        while not request_id or request_id in self._requests:
            request_id = f"req-{next(self._ids)}"
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_ids=self._tokenizer.eos_token_ids,
            arrival_time_s=_arrival(arrival_time_s),
            priority=priority,
        )
        lane = min(self._lanes_holding(request, live), key=lambda candidate: candidate.load)
        lane.scheduler.add_request(request)
        self._requests.add(TrackedRequest(
            request=request,
            lane=lane,
            final_only=final_only,
            channel=ItemChannel() if outputs is None else outputs,
            completions=[
                CompletionStream(request_id, index, self._tokenizer, prompt_token_ids, params, text_at_end=final_only)
                for index in range(params.n)
            ],
        ))
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
        if any(lane.scheduler.can_ever_hold(request) for lane in self._lane_set.lanes):
            raise WorkerUnavailableError("no serving worker's KV pool holds the request; the workers whose pools "
                                         "do are down (retry later)")
        largest = max(self._lane_set.lanes, key=lambda lane: lane.scheduler.block_manager.gpu.num_blocks).scheduler
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
        self._requests.abort(request_id)

    def status(self) -> EngineStatus:
        return sum_status(self.worker_status(), self._results.num_steps, self._times,
                          self._lane_set.num_waiting_for_a_worker)

    def worker_status(self) -> list[WorkerStatus]:
        """Each worker's lane, dead ones included, with the counters of its earlier lanes carried over."""
        return self._lane_set.worker_status()

    def recent_steps(self) -> list[StepRecord]:
        """The last RECENT_STEPS steps of every lane, in the order their results arrived (call it on the loop)."""
        return self._results.recent_steps()

    def _notify_health(self) -> None:
        event, self._health_changed = self._health_changed, asyncio.Event()
        event.set()
        is_serving = self.is_serving
        if is_serving != self._was_serving:
            self._was_serving = is_serving
            log.info("engine_health_changed", is_serving=is_serving,
                     num_live_workers=sum(lane.is_alive for lane in self._lane_set.lanes),
                     is_draining=self._is_draining)


def _arrival(arrival_time_s: float | None) -> float:
    """A request's arrival on the host's monotonic clock: the given time when it is a positive time before now (a
    relay's unset 0 is not), else now."""
    now = time.monotonic()
    if arrival_time_s is None or not 0.0 < arrival_time_s < now:  # also NaN
        return now
    return arrival_time_s
