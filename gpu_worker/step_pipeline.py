"""Drives a Worker from asyncio with consecutive steps overlapped on the device."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.worker import Worker

T = TypeVar("T")


class StepPipeline:
    """Launches steps on one thread, in the order launch() is called, and waits for and finishes them on another.

    While the wait thread blocks on step N's tokens, the step thread can already queue step N+1 behind it, so
    the device goes from one forward pass to the next without waiting for the host. A step whose sampling is
    deferred (launched_step.py) gets it queued by the worker's own thread; the wait thread waits for that first.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-step")
        self._wait_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-wait")

    def call(self, function: Callable[[], T]) -> asyncio.Future[T]:
        """Runs function on the step thread, after every call and launch submitted before it."""
        return asyncio.get_running_loop().run_in_executor(self._step_thread, function)

    def launch(self, step: StepPlan, stream: LaunchStream | None = None) -> asyncio.Future[LaunchedStep]:
        """Submits the step's launch now (so launches keep call order); InvalidStepError comes out of the future.
        stream: the steps submitted one after another without waiting, of which none may launch after one failed."""
        if stream is None:
            return self.call(lambda: self.worker.launch(step))
        return self.call(lambda: stream.launch(self.worker, step))

    async def finish(self, launched: LaunchedStep) -> StepResult:
        """The step's result, once its tokens reached the host; steps must be finished in launch order. Runs on
        the wait thread: a launch that waits on the step thread for an earlier step's deferred sampling must not hold
        back the results the control plane needs to keep its steps in flight."""
        return await asyncio.get_running_loop().run_in_executor(self._wait_thread, self.worker.finish, launched)

    def close(self) -> None:
        self._wait_thread.shutdown(wait=True)
        self._step_thread.shutdown(wait=True)


class LaunchStream:
    """The steps of one stream, submitted to the step thread as they arrive rather than each after the launch before
    it, so that the next step is decoded and queued while the current one launches. A step that fails to launch
    (refused, changing nothing) ends the stream there: the steps queued behind it are not launched, so the worker's
    state stays that of the steps before it; nor are those still queued when the stream ends (end())."""

    def __init__(self) -> None:
        self._failed_step_id: int | None = None
        self._is_ended = False

    def end(self) -> None:
        """The stream is over (its replies stop): the steps still queued are not launched. Any thread."""
        self._is_ended = True

    def launch(self, worker: Worker, step: StepPlan) -> LaunchedStep:
        if self._failed_step_id is not None:
            raise StepNotLaunchedError(f"step {step.step_id} not launched: step {self._failed_step_id} of its stream "
                                       "failed")
        if self._is_ended:
            raise StepNotLaunchedError(f"step {step.step_id} not launched: its stream ended")
        try:
            return worker.launch(step)
        except BaseException:
            self._failed_step_id = step.step_id
            raise


class StepNotLaunchedError(RuntimeError):
    """A step queued behind one that failed, or still queued when its stream ended: the stream's end says why."""
