"""The engine after a lane fails: reviving it, draining, and the engine's health as the frontend follows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagedserve.control_plane.engine.outputs import StreamItem
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, engine_service_pb2
from tests.control_plane.engine_fakes import (
    BLOCK_SIZE,
    LONG,
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


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


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
