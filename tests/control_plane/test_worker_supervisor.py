"""WorkerSupervisor against a fake engine and fake worker clients: what it revives, how long it waits between tries,
when it gives up, and when it says that no worker is left."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.control_plane.config import CacheConfig, SchedulerConfig, WorkerRestartPolicy, WorkerSupervisorConfig
from pagedserve.control_plane.engine.engine import StepTransport
from pagedserve.control_plane.engine.lane_set import LaneDeadCallback
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.launch.worker_supervisor import LaneSetup, SupervisedClient, WorkerSupervisor
from pagedserve.control_plane.scheduling.scheduler import Scheduler

SETUP = LaneSetup(CacheRequest(block_size=4), SchedulerConfig(max_model_len=64), CacheConfig(block_size=4))
DEFAULTS = WorkerSupervisorConfig()


def _info(worker_id: str, model: str = "tiny") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, model=model, architecture="LlamaForCausalLM", dtype="float32",
                      device="cpu", vocab_size=512, max_position_embeddings=64)


class FakeClient:
    """A worker client whose worker answers with info and num_gpu_blocks, or fails each call with failure."""

    def __init__(self, address: str, info: WorkerInfo, num_gpu_blocks: int = 8,
                 failure: Exception | None = None) -> None:
        self.address = address
        self.info = info
        self.num_gpu_blocks = num_gpu_blocks
        self.failure = failure
        self.is_closed = False
        self.cache_requests: list[CacheRequest] = []

    async def wait_until_serving(self, timeout_s: float) -> None:
        pass

    async def get_info(self) -> WorkerInfo:
        if self.failure is not None:
            raise self.failure
        return self.info

    async def init_cache(self, request: CacheRequest) -> CacheInfo:
        self.cache_requests.append(request)
        return CacheInfo(self.num_gpu_blocks, 0)

    async def send(self, plan: StepPlan) -> None:
        raise AssertionError("the supervisor sends no step")

    async def receive(self) -> StepResult:
        raise AssertionError("the supervisor receives no step")

    async def close(self) -> None:
        self.is_closed = True


class FakeEngine:
    """The engine's lane API, recording each revival and each lane given up."""

    def __init__(self) -> None:
        self.callbacks: list[LaneDeadCallback] = []
        self.revived: list[tuple[str, StepTransport, Scheduler]] = []
        self.expects_revivals = False
        self.abandoned: list[str] = []

    def on_lane_dead(self, callback: LaneDeadCallback) -> None:
        self.callbacks.append(callback)

    def revive_lane(self, worker_id: str, transport: StepTransport, scheduler: Scheduler) -> None:
        self.revived.append((worker_id, transport, scheduler))

    def expect_revivals(self) -> None:
        self.expects_revivals = True

    def abandon_lane(self, worker_id: str) -> None:
        self.abandoned.append(worker_id)

    def kill(self, worker_id: str) -> None:
        for callback in self.callbacks:
            callback(worker_id, WorkerUnavailableError(f"worker {worker_id} closed its step stream"))


class Clock:
    """Monotonic time that only the fake sleep advances; records each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.sleeps.append(delay_s)
        self.now += delay_s


def _supervisor(
    engine: FakeEngine, worker_ids: list[str], connect: Callable[[str], SupervisedClient], clock: Clock,
    config: WorkerSupervisorConfig = DEFAULTS,
) -> WorkerSupervisor:
    workers: list[tuple[SupervisedClient, WorkerInfo]] = [
        (FakeClient(f"host-{worker_id}:1", _info(worker_id)), _info(worker_id)) for worker_id in worker_ids
    ]
    return WorkerSupervisor(engine, workers, None, SETUP, config, connect, clock=clock.time, sleep=clock.sleep)


async def _settle(supervisor: WorkerSupervisor) -> None:
    """Lets the revivals under way run to their end (the fake sleep never blocks)."""
    for _ in range(100):
        await asyncio.sleep(0)


def test_a_dead_lane_is_revived_after_one_second_with_a_fresh_scheduler_sized_by_init_cache() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()
        reconnected: list[FakeClient] = []

        def connect(address: str) -> FakeClient:
            reconnected.append(FakeClient(address, _info("worker-0"), num_gpu_blocks=12))
            return reconnected[-1]

        supervisor = _supervisor(engine, ["worker-0"], connect, clock)
        old = supervisor.clients[0]
        engine.kill("worker-0")
        await _settle(supervisor)

        ((worker_id, transport, scheduler),) = engine.revived
        assert (worker_id, transport, clock.sleeps) == ("worker-0", reconnected[0], [1.0])
        assert reconnected[0].address == "host-worker-0:1"
        assert reconnected[0].cache_requests == [SETUP.cache_request]
        assert scheduler.block_manager.gpu.num_blocks == 12
        assert scheduler.block_manager.gpu.num_free_blocks == 12
        assert isinstance(old, FakeClient) and old.is_closed
        assert not supervisor.all_lost.is_set()
        await supervisor.close()
        assert reconnected[0].is_closed

    asyncio.run(run())


def test_failed_tries_back_off_doubling_and_stop_at_the_limit_then_no_worker_is_left() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()

        def connect(address: str) -> FakeClient:
            return FakeClient(address, _info("worker-0"), failure=WorkerUnavailableError("connection refused"))

        supervisor = _supervisor(engine, ["worker-0"], connect, clock)
        engine.kill("worker-0")
        await _settle(supervisor)

        assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]  # --max-worker-restarts 5
        assert engine.revived == []
        assert supervisor.all_lost.is_set()
        assert (engine.expects_revivals, engine.abandoned) == (True, ["worker-0"])  # its waiting requests end

    asyncio.run(run())


def test_the_backoff_is_capped_and_tries_older_than_the_window_no_longer_count() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()
        config = WorkerSupervisorConfig(max_restarts=3, restart_window_s=600.0, max_backoff_s=3.0)
        supervisor = _supervisor(engine, ["worker-0"], lambda a: FakeClient(a, _info("worker-0")), clock, config)
        for _ in range(3):  # each revival succeeds, then the worker dies again at once
            engine.kill("worker-0")
            await _settle(supervisor)
        clock.now += 600.0  # ten quiet minutes
        engine.kill("worker-0")
        await _settle(supervisor)

        assert clock.sleeps == [1.0, 2.0, 3.0, 1.0]
        assert len(engine.revived) == 4
        assert not supervisor.all_lost.is_set()

    asyncio.run(run())


def test_a_worker_that_comes_back_with_another_model_is_not_revived() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()
        config = WorkerSupervisorConfig(max_restarts=1)
        supervisor = _supervisor(engine, ["worker-0"], lambda a: FakeClient(a, _info("worker-0", "other")), clock,
                                 config)
        engine.kill("worker-0")
        await _settle(supervisor)

        assert engine.revived == []
        assert supervisor.all_lost.is_set()

    asyncio.run(run())


def test_with_restart_never_a_dead_lane_stays_dead_and_only_the_last_one_ends_serving() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()
        config = WorkerSupervisorConfig(restart_policy=WorkerRestartPolicy.NEVER)
        supervisor = _supervisor(engine, ["worker-0", "worker-1"], lambda a: FakeClient(a, _info("?")), clock,
                                 config)
        engine.kill("worker-0")
        await _settle(supervisor)
        after_first = supervisor.all_lost.is_set()
        engine.kill("worker-1")
        await _settle(supervisor)

        assert (after_first, supervisor.all_lost.is_set()) == (False, True)
        assert (engine.revived, clock.sleeps) == ([], [])
        assert (engine.expects_revivals, engine.abandoned) == (False, ["worker-0", "worker-1"])

    asyncio.run(run())


def test_lane_deaths_after_stop_are_not_revived() -> None:
    async def run() -> None:
        engine, clock = FakeEngine(), Clock()
        supervisor = _supervisor(engine, ["worker-0"], lambda a: FakeClient(a, _info("worker-0")), clock)
        await supervisor.stop()
        engine.kill("worker-0")  # the engine's lanes die as serve closes their clients
        await _settle(supervisor)

        assert (engine.revived, clock.sleeps, supervisor.all_lost.is_set()) == ([], [], False)

    asyncio.run(run())
