"""A step whose sampling reads earlier tokens on the host is launched with only its forward pass queued; the worker's
own thread queues its sampling as soon as its token masks are ready, it gives the tokens it gives one step at a time,
and a failure on the way ends the step with its error instead of a hang."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import pytest
import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.model_runner import LaunchedRun, RowsAtLaunch
from pagedserve.gpu_worker.sampler import SamplingRow
from pagedserve.gpu_worker.sequence_state import ScheduledWork
from pagedserve.gpu_worker.step_pipeline import StepPipeline
from tests.gpu_worker.harness import STORIES_DIR, load_worker
from tests.gpu_worker.test_overlapped_steps import BLOCK_SIZE, _run_one_at_a_time, _steps, _tokens

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

    def recording_masks(rows: list[SamplingRow]) -> torch.Tensor | None:
        masks_started.set()
        return token_masks(rows)

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


async def _through_pipeline(pipeline: StepPipeline, steps: list[StepPlan]) -> list[StepResult]:
    """Every step launched before any is finished."""
    launched = [await pipeline.launch(step) for step in steps]
    return [await asyncio.wait_for(pipeline.finish(step), timeout=30) for step in launched]


def test_steps_all_launched_before_any_finishes_give_the_tokens_of_one_at_a_time() -> None:
    steps = _steps(CONSTRAINED, num_decodes=3)
    expected = _run_one_at_a_time(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32), steps)
    pipeline = StepPipeline(load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32))
    try:
        results = asyncio.run(_through_pipeline(pipeline, steps))
    finally:
        pipeline.close()
    assert _tokens(results, 1) == _tokens(expected, 1)


def test_token_masks_that_fail_end_the_step_with_their_error(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=32)
    steps = _steps(CONSTRAINED, num_decodes=2)
    pipeline = StepPipeline(worker)

    def broken(*_: object) -> None:
        raise ValueError("mask engine down")

    async def run() -> None:
        first = await pipeline.launch(steps[0])
        await pipeline.finish(first)
        monkeypatch.setattr(worker.runner.sampler, "token_masks", broken)
        second = await pipeline.launch(steps[1])
        with pytest.raises(ValueError, match="mask engine down"):
            await asyncio.wait_for(pipeline.finish(second), timeout=30)

    try:
        asyncio.run(run())
    finally:
        pipeline.close()
