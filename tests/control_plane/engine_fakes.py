"""A fake worker behind the engine's StepTransport, and the lanes, engines and helpers the engine tests share."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import StreamItem
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.factories import FakeWorker, make_scheduler, make_worker

NUM_BLOCKS, BLOCK_SIZE = 64, 4
PROMPT = (1, 450, 1701)
LONG = 500  # tokens: a request this long is still running when the test acts on it
T = TypeVar("T")


class _Transport:
    """A fake worker behind the engine's StepTransport: a step's result is ready when it is sent, and receiving it
    takes a turn of the loop (step_s > 0: that long, as on a device; a test may change it meanwhile).
    break_with(error): every receive from then on raises error; hang(): no receive returns any more; block_sends():
    no send returns any more (the worker stopped reading its stream); end_stream(): wait_closed() returns, as when
    the worker process is gone."""

    def __init__(self, worker: FakeWorker, step_s: float = 0.0) -> None:
        self._worker = worker
        self.step_s = step_s
        self._results: deque[StepResult] = deque()
        self._error: Exception | None = None
        self._is_hung = False
        self._are_sends_blocked = False
        self._stream_ended = asyncio.Event()
        self.is_closed = False

    def break_with(self, error: Exception) -> None:
        self._error = error

    def hang(self) -> None:
        self._is_hung = True

    def block_sends(self) -> None:
        self._are_sends_blocked = True

    def end_stream(self) -> None:
        self._stream_ended.set()
        self.break_with(WorkerUnavailableError("the step stream ended"))

    async def send(self, plan: StepPlan) -> None:
        if self._are_sends_blocked:
            await asyncio.get_running_loop().create_future()  # never done
        self._results.append(self._worker.execute(plan))

    async def receive(self) -> StepResult:
        await asyncio.sleep(self.step_s)
        if self._error is not None:
            raise self._error
        if self._is_hung:
            await asyncio.get_running_loop().create_future()  # never done
        return self._results.popleft()

    async def wait_closed(self) -> str | None:
        await self._stream_ended.wait()
        return None

    async def close(self) -> None:
        self.is_closed = True


def _lane(worker_id: str, step_s: float = 0.0) -> tuple[str, Scheduler, _Transport]:
    scheduler = make_scheduler(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    return worker_id, scheduler, _Transport(make_worker(scheduler), step_s)


def _engine(tokenizer: Tokenizer, lanes: list[tuple[str, Scheduler, _Transport]],
            step_timeout_s: float = 30.0, worker_failure_retries: int = 1,
            worker_failure_wait_s: float = 60.0) -> Engine:
    config = EngineConfig(step_timeout_s=step_timeout_s, worker_failure_retries=worker_failure_retries,
                          worker_failure_wait_s=worker_failure_wait_s)
    engine = Engine(lanes, tokenizer, config, EngineMetrics("fake", 2048))
    engine.start()
    return engine


def _params(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n)


async def _until(condition: Callable[[], bool]) -> None:
    """Lets the engine run, a loop turn at a time, until condition holds."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _drain_stream(stream: AsyncIterator[StreamItem]) -> list[StreamItem]:
    return [item async for item in stream]


def _tokens(items: list[StreamItem], index: int = 0) -> list[int]:
    return [t for item in items if item.chunk.completion_index == index for t in item.chunk.token_ids]


def _run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def _used_running_waiting_total(engine: Engine) -> tuple[int, int, int, int]:
    status = engine.status()
    return status.num_used_blocks, status.num_requests_running, status.num_requests_waiting, status.num_total_blocks
