"""Steps launched before the previous one finished: the device reads the pending tokens, results are unchanged."""

from __future__ import annotations

import json

import pytest

from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import BlockTableUpdate, NewSequence, ScheduledSequence, StepPlan, StepResult
from pagedserve.gpu_worker.worker import Worker
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, load_worker

BLOCK_SIZE = 4
GOLDEN = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
PROMPT = tuple(GOLDEN["prompt_ids"])  # 5 tokens
EXPECTED = GOLDEN["greedy_new_ids"]
DEVICES = pytest.mark.parametrize(
    "device", [pytest.param(DeviceKind.CPU, id="cpu"), pytest.param(DeviceKind.CUDA, id="cuda", marks=NEEDS_GPU)]
)
GREEDY = SamplingParams(temperature=0.0)


def _steps(options: SamplingParams, num_decodes: int, fork_seq_ids: tuple[int, ...] = ()) -> list[StepPlan]:
    """Prompt of sequence 1 (with its siblings), then one decode step of all of them at a time; each sequence
    gets blocks 4 * seq_id onwards, so the siblings never share a block."""
    seq_ids = (1, *fork_seq_ids)
    first = NewSequence(1, PROMPT, (), options, (4, 5), 0, len(PROMPT), fork_seq_ids=fork_seq_ids)
    steps = [StepPlan(0, new_sequences=(first,))]
    for step_id in range(1, num_decodes + 1):
        position = len(PROMPT) + step_id - 1  # the token this step computes
        scheduled = []
        for seq_id in seq_ids:
            updates: tuple[BlockTableUpdate, ...] = ()
            if seq_id != 1 and step_id == 1:  # a sibling's own copy of the prompt's blocks
                updates = (BlockTableUpdate(0, (4 * seq_id, 4 * seq_id + 1)),)
            if position % BLOCK_SIZE == 0:
                updates += (BlockTableUpdate(position // BLOCK_SIZE, (4 * seq_id + position // BLOCK_SIZE,)),)
            scheduled.append(ScheduledSequence(seq_id, 1, updates))
        copies = tuple((b, 4 * s + b - 4) for s in fork_seq_ids for b in (4, 5)) if step_id == 1 else ()
        steps.append(StepPlan(step_id, block_copies=copies, scheduled_sequences=tuple(scheduled)))
    return steps


def _run_one_at_a_time(worker: Worker, steps: list[StepPlan]) -> list[StepResult]:
    return [worker.execute(step) for step in steps]


def _run_two_in_flight(worker: Worker, steps: list[StepPlan]) -> list[StepResult]:
    """Launches step N+1 before finishing step N, as the worker's service does when steps arrive in time."""
    launched = [worker.launch(steps[0])]
    results = []
    for step in steps[1:]:
        launched.append(worker.launch(step))
        results.append(worker.finish(launched.pop(0)))
    results.append(worker.finish(launched.pop(0)))
    return results


def _tokens(results: list[StepResult], seq_id: int) -> list[int | None]:
    return [next(r.token_id for r in result.outputs if r.seq_id == seq_id) for result in results]


@DEVICES
def test_a_step_launched_before_the_previous_finished_decodes_the_pending_token(device: DeviceKind) -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device)
    results = _run_two_in_flight(worker, _steps(GREEDY, num_decodes=9))
    assert _tokens(results, 1) == EXPECTED[:10]
    assert worker.registry.states[1].output_token_ids == EXPECTED[:10]


@DEVICES
def test_siblings_forked_at_a_pending_first_sample_continue_from_their_own_tokens(device: DeviceKind) -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device)
    results = _run_two_in_flight(worker, _steps(GREEDY, num_decodes=6, fork_seq_ids=(2, 3)))
    for seq_id in (1, 2, 3):
        assert _tokens(results, seq_id) == EXPECTED[:7]


@DEVICES
def test_penalised_and_seeded_sampling_is_the_same_with_steps_in_flight(device: DeviceKind) -> None:
    options = SamplingParams(temperature=0.8, seed=11, repetition_penalty=1.3, frequency_penalty=0.5)
    steps = _steps(options, num_decodes=8, fork_seq_ids=(2,))
    one_at_a_time = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device),
                                       steps)
    in_flight = _run_two_in_flight(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device),
                                   steps)
    for seq_id in (1, 2):
        assert _tokens(in_flight, seq_id) == _tokens(one_at_a_time, seq_id)


def test_finishing_a_later_step_first_drops_the_older_one_but_keeps_its_tokens() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    steps = _steps(GREEDY, num_decodes=2)
    first, second = worker.launch(steps[0]), worker.launch(steps[1])
    assert _tokens([worker.finish(second)], 1) == EXPECTED[1:2]
    with pytest.raises(RuntimeError, match="not in flight"):
        worker.finish(first)
    assert _tokens([worker.execute(steps[2])], 1) == EXPECTED[2:3]
    assert worker.registry.states[1].output_token_ids == EXPECTED[:3]


def test_each_result_reports_its_device_time_and_the_idle_time_before_it() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    results = _run_two_in_flight(worker, _steps(GREEDY, num_decodes=3))
    assert all(r.forward_time_ms > 0 and r.step_time_ms > 0 and r.idle_time_ms >= 0 for r in results)
    assert results[0].idle_time_ms == 0.0


@DEVICES
def test_a_prompt_chunk_that_samples_nothing_still_reports_its_device_time(device: DeviceKind) -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device)
    chunk = NewSequence(1, PROMPT, (), GREEDY, (4, 5), 0, 3)
    steps = [StepPlan(0, new_sequences=(chunk,)), StepPlan(1, scheduled_sequences=(ScheduledSequence(1, 2),))]
    first, rest = _run_two_in_flight(worker, steps)
    assert _tokens([first], 1) == [None] and _tokens([rest], 1) == EXPECTED[:1]
    assert first.forward_time_ms > 0 and rest.forward_time_ms > 0
