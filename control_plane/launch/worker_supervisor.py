"""Brings dead worker lanes back: restarts a local worker that `serve` started (or reconnects to an external one),
re-initialises its cache and hands the engine a fresh scheduler; tells `serve` when no lane is left."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.control_plane.config import CacheConfig, SchedulerConfig, WorkerRestartPolicy, WorkerSupervisorConfig
from pagedserve.control_plane.engine.engine import StepTransport
from pagedserve.control_plane.engine.lane_set import LaneDeadCallback
from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, wait_for_worker
from pagedserve.control_plane.scheduling.scheduler import Scheduler

log = structlog.get_logger()


class SupervisedClient(StepTransport, Protocol):
    """The part of a GrpcWorkerClient the supervisor uses (and hands the engine as the lane's transport)."""

    address: str

    async def wait_until_serving(self, timeout_s: float) -> None: ...

    async def get_info(self) -> WorkerInfo: ...

    async def init_cache(self, request: CacheRequest) -> CacheInfo: ...

    async def close(self) -> None: ...


class SupervisedEngine(Protocol):
    """The part of the Engine the supervisor drives."""

    def on_lane_dead(self, callback: LaneDeadCallback) -> None: ...

    def revive_lane(self, worker_id: str, transport: StepTransport, scheduler: Scheduler) -> None: ...

    def expect_revivals(self) -> None: ...

    def abandon_lane(self, worker_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LaneSetup:
    """What a worker is asked for when it comes back, and how its scheduler is built: as start_engine does."""

    cache_request: CacheRequest
    scheduler: SchedulerConfig  # with max_model_len resolved for the served model
    cache: CacheConfig


@dataclass(slots=True, eq=False)
class _Worker:
    """One worker as the supervisor sees it. Invariant: is_live, or a revival task runs, or it is given up."""

    worker_id: str
    address: str
    client: SupervisedClient
    info: WorkerInfo  # as first seen: a worker that comes back must serve the same model
    launch_index: int | None  # its index in LocalWorkers; None: an external worker
    tries: deque[float] = field(default_factory=deque)  # monotonic start times of the tries in the window
    is_live: bool = True
    revival: asyncio.Task[None] | None = None


class WorkerSupervisor:
    """Watches the engine's lanes. When one dies: with the ON_FAILURE policy, it kills and restarts the local
    worker (or waits for the external one to serve again), calls InitCache, builds a fresh scheduler and revives
    the lane, retrying with exponential backoff up to config.max_restarts tries per worker within
    config.restart_window_s. A lane not revived (NEVER, or out of tries) stays dead; once every lane is dead and
    none is being revived, `all_lost` is set and `serve` exits non-zero.
    """

    def __init__(
        self,
        engine: SupervisedEngine,
        workers: Sequence[tuple[SupervisedClient, WorkerInfo]],
        launcher: LocalWorkers | None,
        setup: LaneSetup,
        config: WorkerSupervisorConfig,
        connect: Callable[[str], SupervisedClient],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._engine = engine
        self._launcher = launcher
        self._setup = setup
        self._config = config
        self._connect = connect
        self._clock = clock
        self._sleep = sleep
        self._workers: dict[str, _Worker] = {}
        for client, info in workers:
            if info.worker_id in self._workers:
                raise ValueError(f"worker_id: two workers report {info.worker_id!r}; give each its own --worker-id")
            index = launcher.worker_index(info.worker_id) if launcher is not None else None
            self._workers[info.worker_id] = _Worker(info.worker_id, client.address, client, info, index)
        self.all_lost = asyncio.Event()
        self._is_stopped = False
        engine.on_lane_dead(self._lane_dead)
        if config.restart_policy is WorkerRestartPolicy.ON_FAILURE:
            engine.expect_revivals()  # a request whose worker failed may wait for its restart

    @property
    def clients(self) -> list[SupervisedClient]:
        """The current client of each worker (a revived worker has a new one)."""
        return [worker.client for worker in self._workers.values()]

    async def stop(self) -> None:
        """Cancels the revivals under way and ignores lane deaths from now on (call it before stopping the engine,
        whose lanes then die of the clients' closing)."""
        self._is_stopped = True
        revivals = [w.revival for w in self._workers.values() if w.revival is not None]
        for revival in revivals:
            revival.cancel()
        await asyncio.gather(*revivals, return_exceptions=True)

    async def close(self) -> None:
        """stop(), then closes every client."""
        await self.stop()
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)

    def _lane_dead(self, worker_id: str, cause: BaseException) -> None:
        worker = self._workers.get(worker_id)
        if self._is_stopped or worker is None or not worker.is_live:
            return
        worker.is_live = False
        if self._config.restart_policy is WorkerRestartPolicy.NEVER:
            self._give_up(worker, "--worker-restart never")
            return
        worker.revival = asyncio.get_running_loop().create_task(self._revive(worker), name=f"revive-{worker_id}")
        worker.revival.add_done_callback(lambda task: self._revival_done(worker, task))

    async def _revive(self, worker: _Worker) -> None:
        """Tries until the lane is revived or the tries of the window are spent."""
        while True:
            now = self._clock()
            while worker.tries and worker.tries[0] <= now - self._config.restart_window_s:
                worker.tries.popleft()
            if len(worker.tries) >= self._config.max_restarts:
                self._give_up(worker, f"{len(worker.tries)} restarts within {self._config.restart_window_s:.0f} s")
                return
            delay_s = min(self._config.initial_backoff_s * 2 ** len(worker.tries), self._config.max_backoff_s)
            worker.tries.append(now)
            log.warning("worker_restart_scheduled", worker_id=worker.worker_id, attempt=len(worker.tries),
                        delay_s=delay_s, local=worker.launch_index is not None)
            await self._sleep(delay_s)
            try:
                client, scheduler = await self._bring_back(worker)
            except Exception as error:  # noqa: BLE001 - any failure of a try is logged and tried again
                expected = isinstance(error, PagedServeError | RuntimeError | OSError)  # unreachable, exited, ...
                log.error("worker_restart_failed", worker_id=worker.worker_id, error=str(error),
                          exc_info=None if expected else error)
                continue
            self._engine.revive_lane(worker.worker_id, client, scheduler)
            worker.client, worker.is_live = client, True
            log.info("worker_restarted", worker_id=worker.worker_id, address=worker.address,
                     num_gpu_blocks=scheduler.block_manager.gpu.num_blocks)
            return

    async def _bring_back(self, worker: _Worker) -> tuple[SupervisedClient, Scheduler]:
        """One try: (re)start the worker, wait until it serves, check it serves the same model, InitCache."""
        await worker.client.close()  # cancels the old step stream, so a live worker drops it and accepts InitCache
        if worker.launch_index is not None and self._launcher is not None:
            worker.address = await asyncio.to_thread(self._launcher.restart, worker.launch_index)
        client = self._connect(worker.address)
        worker.client = client  # closed by the next try or by close()
        deadline = asyncio.get_running_loop().time() + self._config.worker_start_timeout_s
        await wait_for_worker(client, deadline, self._launcher, worker.launch_index)
        info = await client.get_info()
        if (info.worker_id, info.model, info.vocab_size) != (worker.worker_id, worker.info.model,
                                                               worker.info.vocab_size):
            raise RuntimeError(f"worker at {worker.address} now serves {info.worker_id!r} with model {info.model!r}, "
                               f"not {worker.worker_id!r} with {worker.info.model!r}")
        blocks = await client.init_cache(self._setup.cache_request)
        scheduler = Scheduler(self._setup.scheduler, self._setup.cache, blocks.num_gpu_blocks, blocks.num_cpu_blocks)
        return client, scheduler

    def _revival_done(self, worker: _Worker, task: asyncio.Task[None]) -> None:
        worker.revival = None
        if not task.cancelled() and task.exception() is not None:
            log.error("worker_revival_failed", worker_id=worker.worker_id, exc_info=task.exception())
            self._give_up(worker, "its revival failed")

    def _give_up(self, worker: _Worker, reason: str) -> None:
        """Leaves the lane dead; sets all_lost once no lane is live and none is being revived."""
        log.error("worker_lane_abandoned", worker_id=worker.worker_id, reason=reason)
        self._engine.abandon_lane(worker.worker_id)
        if not any(w.is_live or w.revival is not None and w is not worker for w in self._workers.values()):
            log.error("all_workers_lost", num_workers=len(self._workers))
            self.all_lost.set()
