"""A step between launch and finish: queued on the device and recorded in the registry, its tokens still to be read.

A step whose sampling reads earlier tokens on the host (grammars, penalties, bad words) is launched with only its
forward pass queued. Its token masks are computed off the step thread, once the earlier steps' tokens are on the
host, while the device runs that forward pass and the step thread prepares the next step; its sampling is queued
when they are ready (by the next launch, just before its own forward pass, or by a flush), so neither the device nor
the step thread waits for the grammar engine.
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
    """Invariants: `sampling_queued` is set once the step's sampling is queued (at launch for most steps) or
    queueing it failed (`error`); tokens are read (`_resolve`) at most once, under `resolve_lock`."""

    step_id: int
    run: LaunchedRun
    pending: list[PendingToken]
    span: DeviceSpan
    host_s: float  # host time spent on the step so far
    token_masks: Future[torch.Tensor | None] | None = None  # of a deferred sampling, computed off the step thread
    sample: SampleResult | None = None  # set once the tokens have been read and written into the registry
    is_resolved: bool = False
    error: BaseException | None = None  # queueing the deferred sampling failed
    sampling_queued: threading.Event = field(default_factory=threading.Event)
    resolve_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_deferred(self) -> bool:
        return self.token_masks is not None and not self.sampling_queued.is_set()

    def wait(self) -> None:
        """Blocks until the step's sampling is queued and its device work is done, the copy of its results to the
        host included (the span closes after it); touches no worker state."""
        self.sampling_queued.wait()
        self.span.wait()
