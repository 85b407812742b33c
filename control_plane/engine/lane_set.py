"""Every worker's lane through its lives: its loop started, its death when anything in it fails, its revival."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

import structlog

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.failover import Failover
from pagedserve.control_plane.engine.lane import Lane, StepTimes, StepTransport
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.request_table import RequestTable
from pagedserve.control_plane.engine.status import RetiredCounters, WorkerStatus
from pagedserve.control_plane.errors import PagedServeError, WorkerUnavailableError
from pagedserve.control_plane.scheduling.fit import blocks_for
from pagedserve.control_plane.scheduling.kv_events import KvEventLog
from pagedserve.control_plane.scheduling.scheduler import Scheduler

log = structlog.get_logger()

# Called on the loop with the worker's id and the cause each time a lane dies.
LaneDeadCallback = Callable[[str, BaseException], None]

# (lane, plan, plan_ms, result, counts_idle): applies one of lane's step results, as lane.ResultHandler does.
LaneResultHandler = Callable[[Lane, StepPlan, float, StepResult, bool], None]


class LaneSet:
    """One lane per worker, in the order the workers were given; each lane's loop hands its results to on_result.

    A lane dies when anything in it fails: its worker (WorkerUnavailableError), a step unanswered for
    config.step_timeout_s (a hung worker), or any other exception (logged with its traceback; its requests fail
    as INTERNAL). Then at once its requests end with that error, its scheduler is replaced by an empty one of
    the same size (every block and count released), its transport is closed, on_health_change runs and then the
    on_lane_dead callbacks. revive() puts a restarted worker back. No lane task ends silently.
    lanes: read it, never change it; a lane keeps its place for every life of its worker.
    """

    def __init__(
        self,
        workers: Sequence[tuple[str, Scheduler, StepTransport]],
        config: EngineConfig,
        times: StepTimes,
        requests: RequestTable,
        metrics: EngineMetrics,
        on_result: LaneResultHandler,
        on_health_change: Callable[[], None],
    ) -> None:
        self._config = config
        self._times = times
        self.lanes = [Lane(worker_id, scheduler, transport, config, times)
                      for worker_id, scheduler, transport in workers]
        self._requests = requests
        self._on_result = on_result
        self._on_health_change = on_health_change
        self._retired = {lane.worker_id: RetiredCounters() for lane in self.lanes}  # counters of dead lanes
        self._lane_dead_callbacks: list[LaneDeadCallback] = []
        self._is_stopping = False
        self._closing: set[asyncio.Task[None]] = set()  # transports of dead lanes being closed
        self._kv_events: KvEventLog | None = None
        self._failover = Failover(config, requests, metrics)
        self._abandoned: set[str] = set()  # worker ids whose dead lanes will not be revived

    def start(self) -> None:
        for lane in self.lanes:
            self._start_lane(lane)

    async def stop(self) -> None:
        """Cancels every lane's loop (silently: this is no failure)."""
        self._is_stopping = True
        self._failover.stop()
        tasks = [lane.task for lane in self.lanes if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)

    def live(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.is_alive]

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks of every worker's pool as it is now (a restarted worker may come back with another size; a
        dead one counts with its last)."""
        return sum(lane.scheduler.block_manager.gpu.num_blocks for lane in self.lanes)

    def publish_kv_events(self, events: KvEventLog) -> None:
        """Reports every lane's prefix-cache changes to events from now on (a lane's index is its place in the
        workers given at construction), those of schedulers that replace a dead lane's included."""
        self._kv_events = events
        for lane in self.lanes:
            self._observe_cache(lane)

    def _observe_cache(self, lane: Lane) -> None:
        if self._kv_events is not None:
            lane.scheduler.block_manager.gpu.observer = self._kv_events.lane(self.lanes.index(lane))

    def on_lane_dead(self, callback: LaneDeadCallback) -> None:
        """Registers callback(worker_id, cause), called on the loop each time a lane dies, after its requests
        failed and its blocks were released. An exception in it is logged and ignored."""
        self._lane_dead_callbacks.append(callback)

    @property
    def num_waiting_for_a_worker(self) -> int:
        """Requests of failed workers waiting for a revived lane (Failover)."""
        return self._failover.num_waiting

    def expect_revivals(self) -> None:
        """Dead lanes are revived from now on, or abandoned: a request of a failed worker that no live lane holds
        waits for a revived one (Failover)."""
        self._failover.expect_revivals()

    def abandon(self, worker_id: str) -> None:
        """worker_id's dead lane will not be revived. Once no dead lane is left to wait for, the requests waiting
        for one end with UNAVAILABLE. ValueError if no lane has that id or it is alive."""
        lane = next((lane for lane in self.lanes if lane.worker_id == worker_id), None)
        if lane is None or lane.is_alive:
            raise ValueError(f"worker_id: no dead lane has id {worker_id!r}")
        self._abandoned.add(worker_id)
        self._end_waits_if_no_lane_can_come_back()

    def _end_waits_if_no_lane_can_come_back(self) -> None:
        """Ends the waits for a revived lane once every lane is alive or abandoned: the requests still waiting fit
        no pool there is or will be."""
        if all(lane.is_alive or lane.worker_id in self._abandoned for lane in self.lanes):
            self._failover.give_up_waiting("no worker that holds it is coming back")

    def revive(self, worker_id: str, transport: StepTransport, scheduler: Scheduler) -> None:
        """Puts a restarted worker back into service: a new lane with this transport and scheduler (sized for the
        worker as it is now) replaces worker_id's dead lane and starts its loop, then on_health_change runs.
        ValueError if no lane has that id or it is still alive."""
        index = next((i for i, lane in enumerate(self.lanes) if lane.worker_id == worker_id), None)
        if index is None:
            raise ValueError(f"worker_id: no lane has id {worker_id!r}")
        dead = self.lanes[index]
        if dead.is_alive:
            raise ValueError(f"worker_id: the lane of {worker_id!r} is alive")
        self._retired[worker_id].add(dead.scheduler.stats)
        lane = self.lanes[index] = Lane(worker_id, scheduler, transport, self._config, self._times)
        self._observe_cache(lane)
        self._start_lane(lane)
        self._abandoned.discard(worker_id)
        self._failover.revived(lane)
        self._end_waits_if_no_lane_can_come_back()
        num_blocks, max_model_len = scheduler.block_manager.gpu.num_blocks, scheduler.config.max_model_len
        log.info("lane_revived", worker_id=worker_id, num_gpu_blocks=num_blocks)
        if max_model_len is not None and blocks_for(max_model_len, scheduler.cache_config.block_size) > num_blocks:
            log.warning("revived_pool_below_max_model_len", worker_id=worker_id, num_gpu_blocks=num_blocks,
                        max_model_len=max_model_len, message="the restarted worker's KV pool cannot hold one sequence "
                        "of max_model_len tokens: requests go to other workers when theirs hold them to their end, "
                        "and one whose prompt no pool holds is refused")
        self._on_health_change()

    def worker_status(self) -> list[WorkerStatus]:
        """Each worker's lane, dead ones included, with the counters of its earlier lanes carried over."""
        return [
            WorkerStatus(lane.worker_id, lane.is_alive, self._retired[lane.worker_id].carried(lane.scheduler.stats),
                         lane.scheduler.cache_config, lane.scheduler.block_manager.cpu.num_blocks)
            for lane in self.lanes
        ]

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
        """Hands the lane's requests to the failover when its worker failed, fails the others with the cause
        (WorkerUnavailableError as it is, anything else as INTERNAL, logged with its traceback: an exception in the
        engine's own code could recur wherever a request went), releases every block and count it held, and tells
        the callbacks."""
        if not lane.is_alive:
            return
        lane.is_alive = False
        request_ids = self._requests.ids_on(lane)
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
        live = self.live()
        for request_id in request_ids:
            if not (isinstance(error, WorkerUnavailableError)
                    and self._failover.rescue(request_id, lane, live, error)):
                self._requests.fail(request_id, error)
        old = lane.scheduler
        self._retired[lane.worker_id].add(old.stats)
        lane.scheduler = Scheduler(old.config, old.cache_config, old.block_manager.gpu.num_blocks,
                                   old.block_manager.cpu.num_blocks)
        if self._kv_events is not None:
            self._kv_events.lane_cleared(self.lanes.index(lane))
        self._observe_cache(lane)
        self._on_health_change()
        for callback in list(self._lane_dead_callbacks):
            try:
                callback(lane.worker_id, cause)
            except Exception:
                log.exception("lane_dead_callback_failed", worker_id=lane.worker_id)
