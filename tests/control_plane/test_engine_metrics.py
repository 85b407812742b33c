"""The engine records its metrics where requests and steps end: exact token figures, one series per worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.tracked_request import TokenGaps
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import LONG, PROMPT, _drain_stream, _engine, _lane, _params, _run


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _value(engine: Engine, name: str, **labels: str) -> float | None:
    return engine.metrics.registry.get_sample_value(f"pagedserve:{name}", {"model_name": "fake", **labels})


def _engine_after_one_request(tokenizer: Tokenizer) -> Engine:
    """A stopped engine that served one request of 2 completions of 5 tokens each."""
    async def scenario() -> Engine:
        engine = _engine(tokenizer, [_lane("w0")])
        await _drain_stream(engine.stream(engine.add_request(PROMPT, _params(5, n=2))))
        await engine.stop()
        return engine

    return _run(scenario)


def test_a_finished_request_is_recorded_once_with_its_exact_token_figures(tokenizer: Tokenizer) -> None:
    engine = _engine_after_one_request(tokenizer)
    assert _value(engine, "request_prompt_tokens_sum") == len(PROMPT)
    assert _value(engine, "request_generation_tokens_sum") == 10  # 5 tokens in each of 2 completions
    assert _value(engine, "request_params_n_sum") == 2
    assert _value(engine, "request_params_max_tokens_sum") == 5
    for phase in ("queue", "prefill", "decode", "inference"):
        assert _value(engine, f"request_{phase}_time_seconds_count") == 1, phase
    prefill = _value(engine, "request_prefill_time_seconds_sum") or 0.0
    decode = _value(engine, "request_decode_time_seconds_sum") or 0.0
    assert _value(engine, "request_inference_time_seconds_sum") == pytest.approx(prefill + decode)
    assert _value(engine, "request_success_total", finished_reason="length") == 2
    assert _value(engine, "prompt_tokens_total", worker_id="w0") == len(PROMPT)
    assert _value(engine, "generation_tokens_total", worker_id="w0") == 10
    # Every step's tokens: the prompt once, then each completion's decode steps; the last token sampled by a
    # decode step is never fed back, and steps planned past the length limit compute nothing.
    assert _value(engine, "iteration_tokens_total_sum", worker_id="w0") == len(PROMPT) + 2 * 4


def _latencies_from(tokenizer: Tokenizer, arrival_in_s: float) -> tuple[float, float, float]:
    """TTFT, queue time and end-to-end latency of one request that arrived arrival_in_s from its admission."""
    async def scenario() -> Engine:
        engine = _engine(tokenizer, [_lane("w0")])
        await _drain_stream(engine.stream(engine.add_request(
            PROMPT, _params(3), arrival_time_s=time.monotonic() + arrival_in_s)))
        await engine.stop()
        return engine

    engine = _run(scenario)
    return (_value(engine, "time_to_first_token_seconds_sum") or 0.0,
            _value(engine, "request_queue_time_seconds_sum") or 0.0,
            _value(engine, "e2e_request_latency_seconds_sum") or 0.0)


def test_latencies_count_from_the_frontends_arrival_never_from_a_later_one(tokenizer: Tokenizer) -> None:
    ttft, queue, e2e = _latencies_from(tokenizer, -5.0)  # received by a frontend 5 s before the engine admitted it
    assert 5.0 <= ttft < 60.0 and 5.0 <= queue < 60.0 and 5.0 <= e2e < 60.0
    ttft, queue, e2e = _latencies_from(tokenizer, +5.0)  # a time after admission counts as the admission
    assert 0.0 <= ttft < 5.0 and 0.0 <= queue < 5.0 and 0.0 <= e2e < 5.0


def test_a_workers_counters_survive_its_lane_dying_and_coming_back(tokenizer: Tokenizer) -> None:
    lane = _lane("w0")

    async def scenario() -> tuple[float | None, float | None, float | None]:
        engine = _engine(tokenizer, [lane, _lane("w1")], worker_failure_retries=0)  # the request ends with w0
        first = engine.stream(engine.add_request(PROMPT, _params(LONG)))
        await anext(first)
        lane[2].break_with(WorkerUnavailableError("worker w0 failed"))
        with pytest.raises(WorkerUnavailableError):
            await _drain_stream(first)
        before = _value(engine, "prompt_tokens_total", worker_id="w0")
        alive = _value(engine, "worker_alive", worker_id="w0")
        _, scheduler, transport = _lane("w0")
        engine.revive_lane("w0", transport, scheduler)
        await engine.stop()
        return before, alive, _value(engine, "prompt_tokens_total", worker_id="w0")

    before, alive, after = _run(scenario)
    assert (before, alive, after) == (len(PROMPT), 0, len(PROMPT))


def test_every_token_after_a_requests_first_is_one_inter_token_latency(tokenizer: Tokenizer) -> None:
    engine = _engine_after_one_request(tokenizer)
    assert _value(engine, "time_to_first_token_seconds_count") == 1
    assert _value(engine, "inter_token_latency_seconds_count") == 9  # 10 tokens, the first one is TTFT
    assert (_value(engine, "inter_token_latency_seconds_sum") or 0.0) >= 0.0


def test_gaps_of_one_step_observe_as_each_request_alone_would() -> None:
    grouped, alone = EngineMetrics("fake", 64), EngineMetrics("fake", 64)
    gaps = TokenGaps(now=2.0)
    for previous_s, num_tokens in ((1.5, 1), (1.5, 1), (1.0, 2), (1.5, 1)):
        gaps.add(previous_s, num_tokens)
        alone.observe_itl((2.0 - previous_s) / num_tokens, num_tokens)
    gaps.observe(grouped)

    def samples(metrics: EngineMetrics) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for family in metrics.registry.collect() for s in family.samples
                if s.name.startswith("pagedserve:inter_token_latency_seconds")]

    assert samples(grouped) == samples(alone)
    assert grouped.registry.get_sample_value("pagedserve:inter_token_latency_seconds_count",
                                             {"model_name": "fake"}) == 5
    assert grouped.registry.get_sample_value("pagedserve:inter_token_latency_seconds_sum",
                                             {"model_name": "fake"}) == pytest.approx(3 * 0.5 + 2 * 0.5)
