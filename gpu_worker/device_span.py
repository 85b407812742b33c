"""When a step's device work began and ended, so the worker can report device busy and idle time per step."""

from __future__ import annotations

import time

import torch


class DeviceSpan:
    """The span of one step's device work: CUDA events on a GPU (read on the device's clock, after the work has
    finished), the host clock elsewhere (where work runs as it is queued)."""

    def __init__(self, device: torch.device) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start_s = time.perf_counter()
        self._end_s = self._start_s

    def close(self) -> None:
        """Marks the end of the step's device work (everything queued so far)."""
        if self._events is not None:
            self._events[1].record()
        self._end_s = time.perf_counter()

    def wait(self) -> None:
        """Blocks until the step's device work has finished (releasing the interpreter lock meanwhile)."""
        if self._events is not None:
            self._events[1].synchronize()

    def duration_ms(self) -> float:
        """Busy time of the step; on a GPU only once its work has finished (see wait())."""
        if self._events is not None:
            return float(self._events[0].elapsed_time(self._events[1]))  # elapsed_time is unannotated in torch
        return (self._end_s - self._start_s) * 1e3

    def idle_ms_since(self, previous: DeviceSpan | None) -> float:
        """How long the device had nothing to do between the previous step's end and this step's start."""
        if previous is None:
            return 0.0
        if self._events is not None and previous._events is not None:
            return max(float(previous._events[1].elapsed_time(self._events[0])), 0.0)
        return max((self._start_s - previous._end_s) * 1e3, 0.0)
