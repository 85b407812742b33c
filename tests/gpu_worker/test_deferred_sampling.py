"""A step whose sampling reads earlier tokens on the host is launched with only its forward pass queued; the worker's
own thread queues its sampling as soon as its token masks are ready, it gives the tokens it gives one step at a time,
and a failure on the way ends the step with its error instead of a hang."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent import futures

import llguidance.numpy
import numpy as np
import pytest
import torch
from llguidance import LLExecutor, LLMatcher
from numpy.typing import NDArray

from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker.host_transfer import HeldLockCopies
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.model_runner import LaunchedRun, RowsAtLaunch
from pagedserve.gpu_worker.sampler import SamplingRow
from pagedserve.gpu_worker.sequence_state import PendingToken, ScheduledWork, SequenceRegistry
from pagedserve.gpu_worker.step_pipeline import StepPipeline
from pagedserve.gpu_worker.worker import Worker
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, load_worker
from tests.gpu_worker.test_overlapped_steps import BLOCK_SIZE, _run_one_at_a_time, _run_two_in_flight, _steps, _tokens

CHOICE = StructuredOutput(ConstraintKind.CHOICE, choices=("Once upon a time", "One day, a little girl"))
CONSTRAINED = SamplingParams(temperature=0.9, seed=5, structured_output=CHOICE)


def _queued_without_another_launch(launched: LaunchedStep) -> bool:
    """Whether the step's deferred sampling gets queued while nothing else is launched or finished."""
    if launched.deferred_sampling is None:
        return False
    done, _ = futures.wait([launched.deferred_sampling], timeout=30)
    return bool(done) and launched.deferred_sampling.exception() is None


def test_a_deferred_sampling_is_queued_as_soon_as_its_masks_are_ready_with_no_next_launch() -> None:
    steps = _steps(CONSTRAINED, num_decodes=6)
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    launched = [worker.launch(steps[0])]
    assert _queued_without_another_launch(launched[0])
    results = []
    for step in steps[1:]:  # two steps in flight: each queued before the older one is finished
        launched.append(worker.launch(step))
        assert _queued_without_another_launch(launched[1])
        results.append(worker.finish(launched.pop(0)))
    results.append(worker.finish(launched.pop(0)))
    assert _tokens(results, 1) == _tokens(expected, 1)


def test_the_token_masks_are_computed_while_the_step_is_being_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masks do not wait for the launch: the forward pass below is only queued once they have started."""
    steps = _steps(CONSTRAINED, num_decodes=2)
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    runner, sampler = worker.runner, worker.runner.sampler
    masks_started = threading.Event()
    token_masks, launch = sampler.token_masks, runner.launch

    def recording_masks(rows: list[SamplingRow], deferred: bool = False) -> torch.Tensor | None:
        masks_started.set()
        return token_masks(rows, deferred)

    def launch_after_masks_started(work: list[ScheduledWork], deferred_rows: RowsAtLaunch | None = None) -> LaunchedRun:
        if deferred_rows is not None:
            assert masks_started.wait(timeout=30), "the token masks had not started when the forward pass was queued"
            masks_started.clear()
        return launch(work, deferred_rows)

    monkeypatch.setattr(sampler, "token_masks", recording_masks)
    monkeypatch.setattr(runner, "launch", launch_after_masks_started)
    launched = [worker.launch(steps[0])]
    results = []
    for step in steps[1:]:  # two steps in flight
        launched.append(worker.launch(step))
        results.append(worker.finish(launched.pop(0)))
    results.append(worker.finish(launched.pop(0)))
    assert _tokens(results, 1) == _tokens(expected, 1)


def test_siblings_of_a_constrained_first_sample_copy_its_grammar_before_any_mask_fill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grammar cannot be copied while its masks are filled (the engine holds its matcher for the fill): the siblings'
    grammars are copied when their parent is added, before any of its masks. Here the fork waits for a fill to start
    and each fill holds its matchers for a while, so copying the parent's grammar at the fork would fail the
    sibling's."""
    steps = _steps(CONSTRAINED, num_decodes=2, fork_seq_ids=(2,))
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    fill, reserve = llguidance.numpy.fill_next_token_bitmask_par, SequenceRegistry.reserve
    filling = threading.Event()

    def slow_fill(executor: LLExecutor, live: list[tuple[LLMatcher, int]], masks: NDArray[np.int32]) -> None:
        filling.set()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            fill(executor, live, masks)

    def reserve_once_filling(registry: SequenceRegistry, work: list[ScheduledWork]) -> list[PendingToken]:
        filling.wait(timeout=0.5)
        return reserve(registry, work)

    monkeypatch.setattr(llguidance.numpy, "fill_next_token_bitmask_par", slow_fill)
    monkeypatch.setattr(SequenceRegistry, "reserve", reserve_once_filling)
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    results = _run_one_at_a_time(worker, steps)
    sibling_grammar = worker.registry.states[2].grammar
    assert sibling_grammar is not None and sibling_grammar.failure is None
    assert [_tokens(results, seq_id) for seq_id in (1, 2)] == [_tokens(expected, seq_id) for seq_id in (1, 2)]


async def _through_pipeline(pipeline: StepPipeline, steps: list[StepPlan]) -> list[StepResult]:
    """Every step launched before any is finished."""
    launched = [await pipeline.launch(step) for step in steps]
    return [await asyncio.wait_for(pipeline.finish(step), timeout=30) for step in launched]


@pytest.mark.parametrize("logprobs", [pytest.param(None, id="masked_argmax", marks=NEEDS_GPU),
                                      pytest.param(1, id="masked_logits", marks=NEEDS_GPU)])
def test_constrained_greedy_steps_on_the_gpu_give_the_cpu_worker_s_tokens(logprobs: int | None) -> None:
    """The device's path: masks filled in page-locked memory, then one kernel (an argmax under the masks, or the masks
    applied to the logits when a row asks for logprobs)."""
    steps = _steps(SamplingParams(temperature=0.0, logprobs=logprobs, structured_output=CHOICE), num_decodes=6)
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    gpu = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=DeviceKind.CUDA)
    assert _tokens(_run_two_in_flight(gpu, steps), 1) == _tokens(expected, 1)


@pytest.mark.parametrize("options", [
    pytest.param(CONSTRAINED, id="seeded"),
    # An argmax row: its sampling is handed the live row, whose outputs later launches have grown.
    pytest.param(SamplingParams(temperature=0.0, structured_output=CHOICE), id="greedy"),
])
def test_steps_all_launched_before_any_finishes_give_the_tokens_of_one_at_a_time(options: SamplingParams) -> None:
    steps = _steps(options, num_decodes=3)
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    pipeline = StepPipeline(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32))
    try:
        results = asyncio.run(_through_pipeline(pipeline, steps))
    finally:
        pipeline.close()
    assert _tokens(results, 1) == _tokens(expected, 1)


def _second_step_fails(worker: Worker, options: SamplingParams, break_it: Callable[[], None],
                       error: type[Exception], match: str) -> None:
    """Runs a prefill step, calls break_it, then expects the next (decode) step to end with the error, not hang."""
    steps = _steps(options, num_decodes=2)
    pipeline = StepPipeline(worker)

    async def run() -> None:
        first = await pipeline.launch(steps[0])
        await pipeline.finish(first)
        break_it()
        second = await pipeline.launch(steps[1])
        with pytest.raises(error, match=match):
            await asyncio.wait_for(pipeline.finish(second), timeout=30)

    try:
        asyncio.run(run())
    finally:
        pipeline.close()


def test_token_masks_that_fail_end_the_step_with_their_error(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)

    def broken(*_: object, **__: object) -> None:
        raise ValueError("mask engine down")

    _second_step_fails(worker, CONSTRAINED, lambda: monkeypatch.setattr(worker.runner.sampler, "token_masks", broken),
                       ValueError, "mask engine down")


@pytest.mark.parametrize("device", [pytest.param(DeviceKind.CUDA, id="cuda", marks=NEEDS_GPU)])
def test_a_held_lock_sampling_that_fails_ends_the_step_with_its_error(device: DeviceKind,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy constrained batch's sampling goes through the driver copies (HeldLockCopies); one that fails there
    ends its step with the error, as any failure on the masks thread does."""
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32, device=device)

    def broken(*_: object) -> None:
        raise RuntimeError("cuMemcpyAsync failed: CUDA_ERROR_ILLEGAL_ADDRESS")

    _second_step_fails(worker, SamplingParams(temperature=0.0, structured_output=CHOICE),
                       lambda: monkeypatch.setattr(HeldLockCopies, "copy", broken), RuntimeError,
                       "CUDA_ERROR_ILLEGAL_ADDRESS")


def test_rows_as_at_launch_copy_the_outputs_a_row_had_unless_it_is_an_argmax_from_its_first_output() -> None:
    greedy = SamplingRow.of(SamplingParams(temperature=0.0), (), [1, 2], [7, 8])
    seeded = SamplingRow.of(SamplingParams(temperature=0.9, seed=5), (), [1, 2], [7, 8])
    at_launch = RowsAtLaunch([greedy, seeded], [0, 1], [2, 2])
    for row in (greedy, seeded):  # later launches append placeholders to the live lists
        row.output_token_ids.append(-1)  # type: ignore[attr-defined]

    kept, copied = at_launch.current_rows()

    assert kept is greedy
    assert copied.output_token_ids == [7, 8]
    assert copied._replace(output_token_ids=seeded.output_token_ids) == seeded
