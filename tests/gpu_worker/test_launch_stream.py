"""A stream's launches queued as its steps arrive: none launches behind a failed one, or once the stream has ended."""

from __future__ import annotations

from typing import cast

import pytest

from pagedserve.contract.step import StepPlan
from pagedserve.gpu_worker.errors import InvalidStepError
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.step_pipeline import LaunchStream, StepNotLaunchedError
from pagedserve.gpu_worker.worker import Worker


class RecordingWorker:
    """Launches every step but one it refuses, and records the steps it was asked to launch."""

    def __init__(self, refused_step_id: int | None = None) -> None:
        self.refused_step_id = refused_step_id
        self.launched: list[int] = []

    def launch(self, step: StepPlan) -> LaunchedStep:
        self.launched.append(step.step_id)
        if step.step_id == self.refused_step_id:
            raise InvalidStepError(f"step {step.step_id} refused")
        return cast(LaunchedStep, object())


def _launch_all(stream: LaunchStream, worker: RecordingWorker, step_ids: range) -> list[str]:
    outcomes = []
    for step_id in step_ids:
        try:
            stream.launch(cast(Worker, worker), StepPlan(step_id))
            outcomes.append("launched")
        except StepNotLaunchedError:
            outcomes.append("not launched")
        except InvalidStepError:
            outcomes.append("refused")
    return outcomes


def test_no_step_behind_a_refused_one_reaches_the_worker() -> None:
    worker = RecordingWorker(refused_step_id=2)
    assert _launch_all(LaunchStream(), worker, range(5)) == ["launched", "launched", "refused", "not launched",
                                                            "not launched"]
    assert worker.launched == [0, 1, 2]


def test_no_step_still_queued_when_the_stream_ends_reaches_the_worker() -> None:
    worker, stream = RecordingWorker(), LaunchStream()
    assert _launch_all(stream, worker, range(2)) == ["launched", "launched"]
    stream.end()
    with pytest.raises(StepNotLaunchedError, match="step 2 not launched: its stream ended"):
        stream.launch(cast(Worker, worker), StepPlan(2))
    assert worker.launched == [0, 1]
