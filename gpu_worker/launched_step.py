"""A step between launch and finish: queued on the device and recorded in the registry, its tokens still to be read.

A step whose sampling reads earlier tokens on the host (grammars, penalties, bad words) is launched with only its
forward pass queued. From the moment the step's work is known, a worker thread waits for the earlier steps' tokens
and computes its token masks, while the step thread queues the forward pass and the device runs it; the thread
queues the sampling as soon as both are done. So neither the device nor the step thread waits for the grammar
engine, the launch's host work and the masks overlap, and the control plane's round trip never sits between one
step's tokens and the next step's sampling.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from pagedserve.gpu_worker.device_span import DeviceSpan
from pagedserve.gpu_worker.model_runner import LaunchedRun
from pagedserve.gpu_worker.sampler import SampleResult
from pagedserve.gpu_worker.sequence_state import PendingToken


@dataclass(slots=True, eq=False)
class LaunchedStep:
    """Invariants: a deferred sampling is queued on the device exactly when `deferred_sampling` is done without an
    error (the other steps' samplings are queued at launch); tokens are read (`_resolve`) at most once, under
    `resolve_lock`."""

    step_id: int
    run: LaunchedRun
    pending: list[PendingToken]
    last_token_index: torch.Tensor | None  # the pending tokens' table rows, on the device (None: nothing samples)
    span: DeviceSpan
    host_s: float  # host time spent on the step so far
    deferred_sampling: Future[None] | None = None  # token masks computed, then the sampling queued, off the step thread
    sample: SampleResult | None = None  # set once the tokens have been read and written into the registry
    is_resolved: bool = False
    resolve_lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> None:
        """Blocks until the step's sampling is queued and its device work is done, the copy of its results to the
        host included (the span closes after it); touches no worker state. Raises as sampling_queued() does."""
        self.sampling_queued()
        self.span.wait()

    def sampling_queued(self) -> None:
        """Blocks until the step's sampling is queued on the device. Raises the failure of a deferred sampling
        (CancelledError when the worker closed before it ran)."""
        if self.deferred_sampling is not None:
            self.deferred_sampling.result()
