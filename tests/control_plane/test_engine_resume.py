"""A request whose worker fails goes on on a live worker: its sequences computed again from their known tokens,
its stream continuing with the tokens it would have had, at most EngineConfig.worker_failure_retries times."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.outputs import StreamItem
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.scheduling.request import Request
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import (
    NUM_BLOCKS,
    PROMPT,
    _drain_stream,
    _engine,
    _lane,
    _params,
    _run,
    _tokens,
    _until,
    _used_running_waiting_total,
)
from tests.control_plane.factories import make_scheduler

MAX_TOKENS = 40
STEP_S = 0.002  # a step's time at the fake worker: the failure comes while every request still runs


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _requests() -> list[tuple[tuple[int, ...], SamplingParams]]:
    """Three requests, admitted in turn to the least loaded of two lanes: the first and third to w0."""
    return [(PROMPT, _params(MAX_TOKENS)), ((1, 319, 4086), _params(MAX_TOKENS)),
            ((1, 3387, 29892, 920), _params(MAX_TOKENS, n=3))]


def _resumptions(engine: Engine) -> dict[str, float | None]:
    return {worker: engine.metrics.registry.get_sample_value("pagedserve:request_resumptions_total",
                                                             {"model_name": "fake", "worker": worker})
            for worker in ("live", "restarted")}


def _completions(items: list[StreamItem], n: int) -> list[list[int]]:
    return [_tokens(items, index) for index in range(n)]


def test_the_requests_of_a_failed_worker_go_on_on_a_live_one_with_the_tokens_they_would_have_had(
    tokenizer: Tokenizer,
) -> None:
    async def alone() -> list[list[list[int]]]:
        engine = _engine(tokenizer, [_lane("solo")])
        request_ids = [engine.add_request(prompt, params) for prompt, params in _requests()]
        streams = await asyncio.gather(*(_drain_stream(engine.stream(rid)) for rid in request_ids))
        await engine.stop()
        return [_completions(items, params.n) for items, (_, params) in zip(streams, _requests(), strict=True)]

    w0, w1 = _lane("w0", STEP_S), _lane("w1", STEP_S)

    async def with_a_failure() -> tuple[list[list[list[int]]], list[int], tuple[tuple[int, int, int, int],
                                                                                 dict[str, float | None]]]:
        engine = _engine(tokenizer, [w0, w1])
        streams = [engine.stream(engine.add_request(prompt, params)) for prompt, params in _requests()]
        firsts = [await anext(stream) for stream in streams]
        before = [len(first.chunk.token_ids) for first in firsts]
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        rests = await asyncio.gather(*(_drain_stream(stream) for stream in streams))
        await _until(lambda: _used_running_waiting_total(engine)[:3] == (0, 0, 0))
        status = _used_running_waiting_total(engine), _resumptions(engine)
        await engine.stop()
        completions = [_completions([first, *rest], params.n)
                       for first, rest, (_, params) in zip(firsts, rests, _requests(), strict=True)]
        return completions, before, status

    with structlog.testing.capture_logs() as logs:
        completions, before, status = _run(with_a_failure)
    assert all(count < MAX_TOKENS for count in before)  # the failure cut every stream short
    assert completions == _run(alone)  # nothing lost, nothing twice, every token as without the failure
    resumed = [(entry["request_id"], entry["failed_worker_id"], entry["worker_id"], entry["worker_failures"])
               for entry in logs if entry["event"] == "request_resumed"]
    assert [(failed, live, count) for _, failed, live, count in resumed] == [("w0", "w1", 1)] * 2
    assert status == ((0, 0, 0, NUM_BLOCKS), {"live": 2, "restarted": 0})  # the live worker's pool, all free


def test_a_request_rides_through_at_most_worker_failure_retries_failures(tokenizer: Tokenizer) -> None:
    lanes = [_lane(f"w{i}", STEP_S) for i in range(3)]

    async def scenario() -> tuple[str, list[str], tuple[int, int, int, int]]:
        engine = _engine(tokenizer, lanes, worker_failure_retries=1)
        stream = engine.stream(engine.add_request(PROMPT, _params(10 * MAX_TOKENS)))  # to w0
        engine.add_request((1, 319, 4086), _params(1))  # to w1, which is then the least loaded but one
        await anext(stream)
        lanes[0][2].break_with(WorkerUnavailableError("worker w0 failed"))
        await _until(lambda: not engine._lane_set.lanes[0].is_alive)
        moved_to = engine._requests.ids_on(engine._lane_set.lanes[1]) + engine._requests.ids_on(
            engine._lane_set.lanes[2])
        index = next(i for i in (1, 2) if engine._requests.ids_on(engine._lane_set.lanes[i]))
        lanes[index][2].break_with(WorkerUnavailableError(f"worker w{index} failed"))
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        await _until(lambda: _used_running_waiting_total(engine)[:3] == (0, 0, 0))
        status = _used_running_waiting_total(engine)
        await engine.stop()
        return str(raised.value), moved_to, status

    message, moved_to, status = _run(scenario)
    assert len(moved_to) == 1  # the first failure moved it
    assert message in ("worker w1 failed", "worker w2 failed")  # the second ended it, a live worker left
    assert status == (0, 0, 0, NUM_BLOCKS)


def test_with_no_retries_the_requests_fail_with_their_worker(tokenizer: Tokenizer) -> None:
    w0, w1 = _lane("w0", STEP_S), _lane("w1", STEP_S)

    async def scenario() -> str:
        engine = _engine(tokenizer, [w0, w1], worker_failure_retries=0)
        stream = engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS)))
        await anext(stream)
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        await engine.stop()
        return str(raised.value)

    assert _run(scenario) == "worker w0 failed"


def test_an_exception_in_the_engine_moves_no_request(tokenizer: Tokenizer) -> None:
    w0, w1 = _lane("w0", STEP_S), _lane("w1", STEP_S)

    async def scenario() -> str:
        engine = _engine(tokenizer, [w0, w1])
        stream = engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS)))
        await anext(stream)
        w0[2].break_with(RuntimeError("a bug"))  # not the worker's failure: it could recur wherever it ran
        with pytest.raises(Exception) as raised:
            await _drain_stream(stream)
        await engine.stop()
        return str(raised.value)

    assert "internal error in the engine (worker w0): RuntimeError: a bug" in _run(scenario)


def test_a_pool_resumes_a_request_only_if_it_holds_each_sequence_with_its_known_tokens_and_one_more() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4)  # 16 slots: a sequence of up to 17 tokens
    request = Request("r", (1, 2, 3), SamplingParams(max_tokens=100, n=2), (2,), 0.0)
    other = make_scheduler(num_blocks=64, block_size=4)
    other.add_request(request)
    request.sequences[0].output_token_ids.extend(range(5, 18))  # 3 + 13 known tokens, and one more: 17
    assert scheduler.can_resume(request)
    request.sequences[1].output_token_ids.extend(range(5, 19))  # its sibling has 18 with the next one
    assert not scheduler.can_resume(request)
    with pytest.raises(ValueError, match="does not fit this worker"):
        scheduler.adopt(request)


def test_worker_failure_retries_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="worker_failure_retries must be >= 0"):
        EngineConfig(worker_failure_retries=-1)


def test_with_no_live_worker_a_request_waits_for_its_restarted_worker_and_goes_on_there(tokenizer: Tokenizer) -> None:
    async def alone() -> list[list[int]]:
        engine = _engine(tokenizer, [_lane("solo")])
        items = await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS, n=2))))
        await engine.stop()
        return _completions(items, 2)

    w0 = _lane("w0", STEP_S)

    async def with_a_restart() -> tuple[list[list[int]], int, tuple[bool, tuple[int, int, int, int]]]:
        engine = _engine(tokenizer, [w0])
        engine.expect_revivals()
        stream = engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS, n=2)))
        first = await anext(stream)
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        await _until(lambda: not engine.is_serving)
        await asyncio.sleep(0.05)  # the request waits, holding nothing
        while_waiting = engine.is_serving, _used_running_waiting_total(engine)
        _, scheduler, transport = _lane("w0", STEP_S)
        engine.revive_lane("w0", transport, scheduler)
        rest = await _drain_stream(stream)
        assert _resumptions(engine) == {"live": 0, "restarted": 1}
        await engine.stop()
        return _completions([first, *rest], 2), len(first.chunk.token_ids), while_waiting

    with structlog.testing.capture_logs() as logs:
        completions, before, while_waiting = _run(with_a_restart)
    assert before < MAX_TOKENS
    assert completions == _run(alone)
    assert while_waiting == (False, (0, 0, 1, 0))  # no worker, no block held; the request counts as waiting
    events = [(entry["event"], entry.get("failed_worker_id"), entry.get("worker_id")) for entry in logs
              if entry["event"] in ("request_waits_for_a_worker", "request_resumed")]
    assert events == [("request_waits_for_a_worker", "w0", None), ("request_resumed", "w0", "w0")]


def _waiting_request_ends(tokenizer: Tokenizer, wait_s: float, abandon: bool) -> tuple[str, float]:
    """A request whose only worker failed, while its restart is expected: how its wait ends, and after how long."""
    w0 = _lane("w0", STEP_S)

    async def scenario() -> tuple[str, float]:
        engine = _engine(tokenizer, [w0], worker_failure_wait_s=wait_s)
        engine.expect_revivals()
        stream = engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS)))
        await anext(stream)
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        await _until(lambda: not engine.is_serving)
        loop = asyncio.get_running_loop()
        failed_at = loop.time()
        if abandon:
            engine.abandon_lane("w0")
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        waited_s = loop.time() - failed_at
        await engine.stop()
        return str(raised.value), waited_s

    return _run(scenario)


def test_a_waiting_request_ends_unavailable_when_no_worker_comes_back_in_time(tokenizer: Tokenizer) -> None:
    message, waited_s = _waiting_request_ends(tokenizer, wait_s=0.2, abandon=False)
    assert message == "worker w0 failed; no worker that holds it came back within 0.2 s"
    assert 0.1 < waited_s < 2.0


def test_a_waiting_request_ends_unavailable_at_once_when_its_worker_is_given_up(tokenizer: Tokenizer) -> None:
    message, waited_s = _waiting_request_ends(tokenizer, wait_s=60.0, abandon=True)
    assert message == "worker w0 failed; no worker that holds it is coming back"
    assert waited_s < 1.0


def test_a_request_aborted_while_it_waits_is_not_resumed(tokenizer: Tokenizer) -> None:
    w0 = _lane("w0", STEP_S)

    async def scenario() -> tuple[tuple[int, int, int, int], int]:
        engine = _engine(tokenizer, [w0])
        engine.expect_revivals()
        request_id = engine.add_request(PROMPT, _params(MAX_TOKENS))
        await anext(engine.stream(request_id))
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        await _until(lambda: not engine.is_serving)
        engine.abort(request_id)
        _, scheduler, transport = _lane("w0", STEP_S)
        engine.revive_lane("w0", transport, scheduler)
        await asyncio.sleep(0.05)
        status = _used_running_waiting_total(engine)
        await engine.stop()
        return status, engine._lane_set._failover.num_waiting

    assert _run(scenario) == ((0, 0, 0, NUM_BLOCKS), 0)


def test_a_worker_whose_max_num_seqs_is_below_the_requests_n_does_not_resume_it() -> None:
    request = Request("r", (1, 2, 3), SamplingParams(max_tokens=4, n=3), (2,), 0.0)
    make_scheduler(num_blocks=64, block_size=4).add_request(request)
    assert not make_scheduler(num_blocks=64, block_size=4, max_num_seqs=2).can_resume(request)
    assert make_scheduler(num_blocks=64, block_size=4, max_num_seqs=3).can_resume(request)


def test_a_waiting_request_that_the_restarted_workers_pool_cannot_hold_ends_at_once(tokenizer: Tokenizer) -> None:
    w0 = _lane("w0", STEP_S)

    async def scenario() -> tuple[str, float]:
        engine = _engine(tokenizer, [w0])
        engine.expect_revivals()
        stream = engine.stream(engine.add_request(PROMPT, _params(MAX_TOKENS)))
        await anext(stream)
        w0[2].break_with(WorkerUnavailableError("worker w0 failed"))
        await _until(lambda: not engine.is_serving)
        scheduler = make_scheduler(num_blocks=1, block_size=2)  # 3 tokens: not the prompt and its outputs
        _, _, transport = _lane("w0", STEP_S)
        loop = asyncio.get_running_loop()
        revived_at = loop.time()
        engine.revive_lane("w0", transport, scheduler)
        with pytest.raises(WorkerUnavailableError) as raised:
            await _drain_stream(stream)
        waited_s = loop.time() - revived_at
        await engine.stop()
        return str(raised.value), waited_s

    message, waited_s = _run(scenario)
    assert message == "worker w0 failed; no worker that holds it is coming back"
    assert waited_s < 1.0  # not the 60 s of worker_failure_wait_s
