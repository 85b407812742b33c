"""The engine when a lane fails: a worker that breaks or hangs, an exception in the scheduler, a lane task that
ends; routing around a dead lane, reviving it, draining; and the engine's health as the frontend follows it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import StreamItem
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.errors import PagedServeError, WorkerUnavailableError
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, engine_service_pb2
from tests.control_plane.factories import FakeWorker, make_scheduler, make_worker

NUM_BLOCKS, BLOCK_SIZE = 64, 4
PROMPT = (1, 450, 1701)
LONG = 500  # tokens: a request this long is still running when the test acts on it
T = TypeVar("T")


class _Transport:
    """A fake worker behind the engine's StepTransport: a step's result is ready when it is sent, and receiving it
    takes a turn of the loop (step_s > 0: that long, as on a device). break_with(error): every receive from then on
    raises error; hang(): no receive returns any more; block_sends(): no send returns any more (the worker stopped
    reading its stream); end_stream(): wait_closed() returns, as when the worker process is gone."""

    def __init__(self, worker: FakeWorker, step_s: float = 0.0) -> None:
        self._worker = worker
        self._step_s = step_s
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
        await asyncio.sleep(self._step_s)
        if self._error is not None:
            raise self._error
        if self._is_hung:
            await asyncio.get_running_loop().create_future()  # never done
        return self._results.popleft()

    async def wait_closed(self) -> None:
        await self._stream_ended.wait()

    async def close(self) -> None:
        self.is_closed = True


class _FailingScheduler(Scheduler):
    """Raises RuntimeError from its fail_at-th schedule() (counting from 1)."""

    def __init__(self, base: Scheduler, fail_at: int) -> None:
        super().__init__(base.config, base.cache_config, NUM_BLOCKS, 0)
        self._fail_at = fail_at
        self._num_calls = 0

    def schedule(self) -> StepPlan:
        self._num_calls += 1
        if self._num_calls == self._fail_at:
            raise RuntimeError(f"injected at step {self._fail_at}")
        return super().schedule()


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _lane(worker_id: str, step_s: float = 0.0) -> tuple[str, Scheduler, _Transport]:
    scheduler = make_scheduler(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    return worker_id, scheduler, _Transport(make_worker(scheduler), step_s)


def _engine(tokenizer: Tokenizer, lanes: list[tuple[str, Scheduler, _Transport]],
            step_timeout_s: float = 30.0) -> Engine:
    engine = Engine(lanes, tokenizer, EngineConfig(step_timeout_s=step_timeout_s), EngineMetrics("fake"))
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


def test_a_worker_that_fails_mid_stream_fails_its_requests_as_unavailable_and_releases_everything(
    tokenizer: Tokenizer,
) -> None:
    lane = _lane("w0")

    async def scenario() -> dict[str, Any]:
        engine = _engine(tokenizer, [lane])
        dead: list[tuple[str, BaseException]] = []
        engine.on_lane_dead(lambda worker_id, cause: dead.append((worker_id, cause)))
        streams = [engine.stream(engine.add_request(PROMPT, _params(LONG))) for _ in range(2)]
        for stream in streams:
            await anext(stream)
        used_before = engine.status().num_used_blocks
        lane[2].break_with(WorkerUnavailableError("worker at 127.0.0.1:1 failed: connection reset"))
        loop = asyncio.get_running_loop()
        broken_at = loop.time()
        errors = []
        for stream in streams:
            with pytest.raises(WorkerUnavailableError) as raised:
                await _drain_stream(stream)
            errors.append(str(raised.value))
        failed_after_s = loop.time() - broken_at
        with pytest.raises(WorkerUnavailableError) as rejected:
            engine.add_request(PROMPT, _params(4))
        await _until(lambda: lane[2].is_closed)
        result = {
            "used_before": used_before, "errors": errors, "failed_after_s": failed_after_s,
            "rejected": str(rejected.value), "status": _used_running_waiting_total(engine),
            "is_serving": engine.is_serving, "dead": dead,
        }
        await engine.stop()
        return result

    result = _run(scenario)
    assert result["used_before"] > 0
    assert result["errors"] == ["worker at 127.0.0.1:1 failed: connection reset"] * 2
    assert result["failed_after_s"] < 0.5
    assert result["rejected"] == "no worker is serving (all 1 failed)"
    assert result["status"] == (0, 0, 0, 0)
    assert result["is_serving"] is False
    assert [(worker_id, str(cause)) for worker_id, cause in result["dead"]] == [
        ("w0", "worker at 127.0.0.1:1 failed: connection reset"),
    ]


def test_an_exception_in_the_scheduler_fails_the_lanes_requests_as_internal_logged_once_with_its_traceback(
    tokenizer: Tokenizer,
) -> None:
    worker_id, base, transport = _lane("w0")
    scheduler = _FailingScheduler(base, fail_at=6)
    transport = _Transport(make_worker(scheduler))

    async def scenario() -> tuple[list[str], list[str], tuple[int, int, int, int], bool, bool]:
        engine = _engine(tokenizer, [(worker_id, scheduler, transport)])
        request_ids = [engine.add_request(PROMPT, _params(LONG), request_id=f"r{i}") for i in range(2)]
        ends = await asyncio.gather(*(_drain_stream(engine.stream(rid)) for rid in request_ids),
                                    return_exceptions=True)
        # No subclass: the frontend reports a plain PagedServeError as INTERNAL.
        assert [type(end) for end in ends] == [PagedServeError] * 2
        errors = [str(end) for end in ends]
        await _until(lambda: transport.is_closed)
        result = request_ids, errors, _used_running_waiting_total(engine), engine.is_serving, transport.is_closed
        await engine.stop()
        return result

    with structlog.testing.capture_logs() as logs:
        request_ids, errors, status, is_serving, is_closed = _run(scenario)
    assert errors == ["internal error in the engine (worker w0): RuntimeError: injected at step 6"] * 2
    failures = [entry for entry in logs if "exc_info" in entry]
    assert len(failures) == 1
    assert failures[0]["event"] == "lane_failed"
    assert failures[0]["log_level"] == "error"
    assert failures[0]["worker_id"] == "w0"
    assert failures[0]["request_ids"] == request_ids
    assert isinstance(failures[0]["exc_info"], RuntimeError)
    assert failures[0]["exc_info"].__traceback__ is not None
    assert status == (0, 0, 0, 0)
    assert not is_serving
    assert is_closed


def test_a_worker_that_never_answers_fails_its_requests_within_the_step_timeout(tokenizer: Tokenizer) -> None:
    lane = _lane("w0")
    timeout_s = 0.2

    async def scenario() -> tuple[str, float, tuple[int, int, int, int], bool]:
        engine = _engine(tokenizer, [lane], step_timeout_s=timeout_s)
        stream = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(stream)
        lane[2].hang()
        loop = asyncio.get_running_loop()
        hung_at = loop.time()
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        failed_after_s = loop.time() - hung_at
        await _until(lambda: lane[2].is_closed)
        result = str(raised.value), failed_after_s, _used_running_waiting_total(engine), engine.is_serving
        await engine.stop()
        return result

    message, failed_after_s, status, is_serving = _run(scenario)
    assert message.startswith("worker w0 did not answer step ")
    assert message.endswith(f" within {timeout_s:g} s")
    assert timeout_s * 0.5 < failed_after_s < timeout_s + 0.3  # the steps in flight when it hung left up to now
    assert status == (0, 0, 0, 0)
    assert not is_serving


def test_a_worker_that_stops_taking_steps_fails_its_requests_within_the_step_timeout(tokenizer: Tokenizer) -> None:
    lane = _lane("w0")

    async def scenario() -> tuple[str, float, tuple[int, int, int, int]]:
        engine = _engine(tokenizer, [lane], step_timeout_s=0.1)
        stream = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(stream)
        lane[2].block_sends()
        loop = asyncio.get_running_loop()
        blocked_at = loop.time()
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        result = str(raised.value), loop.time() - blocked_at, _used_running_waiting_total(engine)
        await engine.stop()
        return result

    message, failed_after_s, status = _run(scenario)
    assert message.startswith("worker w0 did not take step ") and message.endswith(" within 0.1 s")
    assert failed_after_s < 0.1 + 0.3
    assert status == (0, 0, 0, 0)


def test_with_two_lanes_one_dead_new_requests_go_to_the_live_one_which_keeps_serving(tokenizer: Tokenizer) -> None:
    w0, w1 = _lane("w0"), _lane("w1")

    async def reference() -> list[list[int]]:
        engine = _engine(tokenizer, [_lane("solo")])
        request_ids = [engine.add_request((1, 319 + i, 4086), _params(8)) for i in range(3)]
        streams = await asyncio.gather(*(_drain_stream(engine.stream(rid)) for rid in request_ids))
        await engine.stop()
        return [_tokens(items) for items in streams]

    async def scenario() -> tuple[list[list[int]], int, int, int]:
        engine = _engine(tokenizer, [w0, w1])
        on_w0 = engine.stream(engine.add_request(PROMPT, _params(LONG)))  # the least loaded first: w0
        on_w1 = engine.stream(engine.add_request(PROMPT, _params(40)))
        await anext(on_w0)
        first_on_w1 = await anext(on_w1)
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        with pytest.raises(WorkerUnavailableError):
            await _drain_stream(on_w0)
        request_ids = [engine.add_request((1, 319 + i, 4086), _params(8)) for i in range(3)]
        streams = await asyncio.gather(*(_drain_stream(engine.stream(rid)) for rid in request_ids))
        rest_on_w1 = await _drain_stream(on_w1)
        num_w1_tokens = len(_tokens([first_on_w1, *rest_on_w1]))
        status = engine.status()
        await engine.stop()
        return [_tokens(items) for items in streams], num_w1_tokens, status.num_total_blocks, status.num_used_blocks

    with structlog.testing.capture_logs() as logs:
        tokens, num_w1_tokens, num_total_blocks, num_used_blocks = _run(scenario)
    admitted = [entry["worker_id"] for entry in logs if entry["event"] == "request_admitted"]
    assert admitted == ["w0", "w1", "w1", "w1", "w1"]
    assert tokens == _run(reference)
    assert num_w1_tokens == 40
    assert (num_total_blocks, num_used_blocks) == (NUM_BLOCKS, 0)


def test_a_revived_lane_serves_again(tokenizer: Tokenizer) -> None:
    lane = _lane("w0")

    async def scenario() -> tuple[bool, bool, list[int], bool, tuple[int, int, int, int], int]:
        engine = _engine(tokenizer, [lane])
        first = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(first)
        lane[2].break_with(WorkerUnavailableError("worker w0 failed"))
        with pytest.raises(WorkerUnavailableError):
            await _drain_stream(first)
        was_serving = engine.is_serving
        changed = engine.health_changed()
        _, scheduler, transport = _lane("w0")
        engine.revive_lane("w0", transport, scheduler)
        items = await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(6))))
        status = engine.status()
        await engine.stop()
        return (was_serving, engine.is_serving, _tokens(items), changed.is_set(), _used_running_waiting_total(engine),
                status.num_generation_tokens)

    was_serving, is_serving, tokens, changed, status, num_generated = _run(scenario)
    assert not was_serving and is_serving and changed
    assert len(tokens) == 6
    assert status == (0, 0, 0, NUM_BLOCKS)
    assert num_generated > 6  # the dead lane's tokens still count: counters never go down


def test_revive_lane_refuses_a_live_or_unknown_lane(tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        engine = _engine(tokenizer, [_lane("w0")])
        _, scheduler, transport = _lane("w0")
        with pytest.raises(ValueError, match="is alive"):
            engine.revive_lane("w0", transport, scheduler)
        with pytest.raises(ValueError, match="no lane"):
            engine.revive_lane("w9", transport, scheduler)
        await engine.stop()

    _run(scenario)


def test_drain_lets_a_short_request_finish_and_ends_a_long_one_with_an_abort_chunk_and_usage(
    tokenizer: Tokenizer,
) -> None:
    lane = _lane("w0", step_s=0.001)  # LONG steps take far longer than the drain waits

    async def scenario() -> tuple[list[StreamItem], list[StreamItem], str, tuple[int, int, int, int], bool]:
        engine = _engine(tokenizer, [lane])
        short = asyncio.ensure_future(_drain_stream(engine.stream(engine.add_request(PROMPT, _params(4)))))
        long = asyncio.ensure_future(_drain_stream(engine.stream(engine.add_request(PROMPT, _params(LONG, n=2)))))
        await _until(lambda: engine.status().num_requests_running == 2)
        drained = asyncio.ensure_future(engine.drain(timeout_s=0.3))
        await asyncio.sleep(0)
        with pytest.raises(WorkerUnavailableError) as refused:
            engine.add_request(PROMPT, _params(4))
        await drained
        result = await short, await long, str(refused.value), _used_running_waiting_total(engine), engine.is_serving
        await engine.stop()
        return result

    short, long, refused, status, is_serving = _run(scenario)
    assert short[-1].chunk.finish_reason is FinishReason.LENGTH
    assert short[-1].usage is not None and short[-1].usage.completion_tokens == 4
    finals = [item for item in long if item.chunk.finish_reason is not None]
    assert sorted(item.chunk.completion_index for item in finals) == [0, 1]
    assert {item.chunk.finish_reason for item in finals} == {FinishReason.ABORT}
    assert [item.usage is not None for item in long] == [False] * (len(long) - 1) + [True]
    usage = long[-1].usage
    assert usage is not None
    assert 0 < usage.completion_tokens == len(_tokens(long, 0)) + len(_tokens(long, 1)) < 2 * LONG
    assert refused == "server is shutting down"
    assert status == (0, 0, 0, NUM_BLOCKS)
    assert not is_serving


def test_a_lane_task_cancelled_by_anyone_but_stop_fails_its_requests_loudly(tokenizer: Tokenizer) -> None:
    async def scenario() -> str:
        engine = _engine(tokenizer, [_lane("w0")])
        stream = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(stream)
        task = engine._lanes[0].task
        assert task is not None
        task.cancel()
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        await engine.stop()
        return str(raised.value)

    with structlog.testing.capture_logs() as logs:
        message = _run(scenario)
    assert message == "the engine loop of worker w0 was cancelled"
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["worker_failed"]


def test_stop_ends_the_lanes_silently(tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        engine = _engine(tokenizer, [_lane("w0"), _lane("w1")])
        engine.add_request(PROMPT, _params(LONG))
        await asyncio.sleep(0)
        await engine.stop()

    with structlog.testing.capture_logs() as logs:
        _run(scenario)
    assert [entry for entry in logs if entry["log_level"] in ("error", "warning")] == []


def test_step_timeout_must_be_positive() -> None:
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="step_timeout_s must be positive"):
            EngineConfig(step_timeout_s=value)


_MODEL = ServedModel(name="fake", architecture="LlamaForCausalLM", dtype="float32", vocab_size=32000,
                     max_model_len=1024, block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS, num_workers=1,
                     eos_token_ids=(2,))


def test_the_frontend_follows_the_engines_health_and_new_requests_fail_at_once_without_a_worker(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    lane = _lane("w0")

    async def scenario() -> tuple[list[bool], list[bool], str]:
        engine = _engine(tokenizer, [lane])
        address = f"unix:{tmp_path / 'engine.sock'}"
        server = await build_engine_server(EngineServicer(engine, _MODEL), address)
        await server.start()
        client = EngineClient(address)
        client.start()
        reports: list[bool] = []
        reported = asyncio.Event()

        async def set_serving(is_serving: bool) -> None:
            reports.append(is_serving)
            reported.set()

        async def next_report() -> None:
            reported.clear()
            await asyncio.wait_for(reported.wait(), 1.0)  # the frontend learns within a second

        follower = asyncio.create_task(client.follow_health(set_serving))
        await next_report()
        statuses = [(await client._stub.GetStatus(engine_service_pb2.GetStatusRequest())).is_serving]
        lane[2].end_stream()  # while the lane is idle
        await next_report()
        statuses.append((await client._stub.GetStatus(engine_service_pb2.GetStatusRequest())).is_serving)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(WorkerUnavailableError) as raised:
            async for _ in client.stream(client.add_request(PROMPT, common_pb2.SamplingParams(max_tokens=4))):
                pass
        assert loop.time() - started < 0.1
        _, scheduler, transport = _lane("w0")
        engine.revive_lane("w0", transport, scheduler)
        await next_report()
        drained = asyncio.ensure_future(engine.drain(timeout_s=1.0))
        await next_report()
        await drained
        follower.cancel()
        await client.close()
        await server.stop(grace=None)
        await engine.stop()
        return reports, statuses, str(raised.value)

    reports, statuses, message = _run(scenario)
    assert reports == [True, False, True, False]  # serving, worker dead, revived, draining
    assert statuses == [True, False]
    assert message == "no worker is serving (all 1 failed)"


def test_the_frontend_reports_not_serving_when_the_engine_is_unreachable(tmp_path: Path) -> None:
    async def scenario() -> list[bool]:
        client = EngineClient(f"unix:{tmp_path / 'nobody.sock'}")
        reports: list[bool] = []
        reported = asyncio.Event()

        async def set_serving(is_serving: bool) -> None:
            reports.append(is_serving)
            reported.set()

        follower = asyncio.create_task(client.follow_health(set_serving))
        await asyncio.wait_for(reported.wait(), 1.0)
        follower.cancel()
        await client.close()
        return reports

    assert _run(scenario) == [False]
