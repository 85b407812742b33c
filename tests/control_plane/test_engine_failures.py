"""The engine when a lane fails: a worker that breaks or hangs, a scheduler that raises, a lane task that ends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog

from pagedserve.contract.step import StepPlan
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.errors import PagedServeError, WorkerUnavailableError
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import (
    LONG,
    NUM_BLOCKS,
    PROMPT,
    _drain_stream,
    _engine,
    _lane,
    _params,
    _run,
    _tokens,
    _Transport,
    _until,
    _used_running_waiting_total,
)
from tests.control_plane.factories import make_worker


class _FailingScheduler(Scheduler):
    """Raises RuntimeError from its fail_at-th schedule() (counting from 1)."""

    def __init__(self, base: Scheduler, fail_at: int) -> None:
        super().__init__(base.config, base.cache_config, NUM_BLOCKS, 0)
        self._fail_at = fail_at
        self._num_calls = 0

    def schedule(self, drops_alone: bool = True) -> StepPlan:
        self._num_calls += 1
        if self._num_calls == self._fail_at:
            raise RuntimeError(f"injected at step {self._fail_at}")
        return super().schedule(drops_alone)


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


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
        engine = _engine(tokenizer, [w0, w1], worker_failure_retries=0)  # w0's request fails with it
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


def test_a_lane_task_cancelled_by_anyone_but_stop_fails_its_requests_loudly(tokenizer: Tokenizer) -> None:
    async def scenario() -> str:
        engine = _engine(tokenizer, [_lane("w0")])
        stream = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(stream)
        task = engine._lane_set.lanes[0].task
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
