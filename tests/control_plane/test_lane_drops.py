"""A lane drops ended sequences on its worker with the next step that has work, or alone once it idled a while."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagedserve.contract.step import StepPlan
from pagedserve.control_plane.engine import lane
from pagedserve.control_plane.engine.lane import LONE_DROPS_WAIT_S
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import PROMPT, _drain_stream, _engine, _params, _run, _Transport
from tests.control_plane.factories import FakeWorker, make_scheduler, make_worker


class _RecordingTransport(_Transport):
    """Notes each plan sent, with the loop's time."""

    def __init__(self, worker: FakeWorker) -> None:
        super().__init__(worker)
        self.sent: list[tuple[StepPlan, float]] = []

    async def send(self, plan: StepPlan) -> None:
        self.sent.append((plan, asyncio.get_running_loop().time()))
        await super().send(plan)


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _is_drops_alone(plan: StepPlan) -> bool:
    return bool(plan.dropped_seq_ids) and not (plan.new_sequences or plan.scheduled_sequences)


def test_the_next_request_s_first_step_carries_the_drops_of_the_one_that_just_ended(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lane, "LONE_DROPS_WAIT_S", 5.0)  # no pause of this process (a collection) outlasts it
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    transport = _RecordingTransport(make_worker(scheduler))

    async def scenario() -> list[StepPlan]:
        engine = _engine(tokenizer, [("w0", scheduler, transport)])
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(3), request_id="a")))
        await asyncio.sleep(0.001)  # the client's turn-around
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(3), request_id="b")))
        await engine.stop()
        return [plan for plan, _ in transport.sent]

    plans = _run(scenario)

    first_of_b = next(plan for plan in plans if plan.new_sequences and plan.new_sequences[0].seq_id == 1)
    assert first_of_b.dropped_seq_ids == (0,)
    assert not any(_is_drops_alone(plan) for plan in plans[: plans.index(first_of_b)])


def test_an_idle_lane_sends_the_drops_alone_once_it_waited_for_other_work(tokenizer: Tokenizer) -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    transport = _RecordingTransport(make_worker(scheduler))

    async def scenario() -> tuple[float, float, bool]:
        engine = _engine(tokenizer, [("w0", scheduler, transport)])
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(3), request_id="a")))
        ended_s = asyncio.get_running_loop().time()
        await asyncio.wait_for(_until_drops_alone_sent(transport), timeout=5.0)
        plan, sent_s = transport.sent[-1]
        await engine.stop()
        return ended_s, sent_s, plan.dropped_seq_ids == (0,)

    ended_s, sent_s, drops_a = _run(scenario)

    assert drops_a
    assert sent_s - ended_s >= LONE_DROPS_WAIT_S * 0.9  # the loop's clock may round the timer a little early
    assert scheduler.has_pending_drops is False


async def _until_drops_alone_sent(transport: _RecordingTransport) -> None:
    while not (transport.sent and _is_drops_alone(transport.sent[-1][0])):
        await asyncio.sleep(0.001)


def test_a_lane_with_nothing_left_to_drop_sends_nothing_while_idle(tokenizer: Tokenizer) -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    transport = _RecordingTransport(make_worker(scheduler))

    async def scenario() -> int:
        engine = _engine(tokenizer, [("w0", scheduler, transport)])
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(3), request_id="a")))
        await asyncio.wait_for(_until_drops_alone_sent(transport), timeout=5.0)
        num_sent = len(transport.sent)
        await asyncio.sleep(LONE_DROPS_WAIT_S * 3)
        await engine.stop()
        return len(transport.sent) - num_sent

    assert _run(scenario) == 0


def test_a_worker_that_goes_away_while_drops_wait_is_noticed_at_once(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lane, "LONE_DROPS_WAIT_S", 5.0)  # the lane is still holding the drops back when it dies
    scheduler = make_scheduler(num_blocks=64, block_size=4)
    transport = _RecordingTransport(make_worker(scheduler))

    async def scenario() -> tuple[bool, float, int]:
        engine = _engine(tokenizer, [("w0", scheduler, transport)])
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(3), request_id="a")))
        num_sent = len(transport.sent)
        loop = asyncio.get_running_loop()
        ended_s = loop.time()
        transport.end_stream()
        while engine.is_serving and loop.time() - ended_s < 5.0:
            await asyncio.sleep(0.001)
        noticed_s = loop.time() - ended_s
        is_serving = engine.is_serving
        await engine.stop()
        return is_serving, noticed_s, len(transport.sent) - num_sent

    is_serving, noticed_s, num_sent_after = _run(scenario)

    assert is_serving is False
    assert noticed_s < 1.0
    assert num_sent_after == 0  # the held drops never went to the worker that is gone
