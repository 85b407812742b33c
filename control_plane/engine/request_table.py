"""The engine's admitted requests, from admission until their streams end, and each way one ends."""

from __future__ import annotations

import asyncio
import time

import structlog

from pagedserve.control_plane.engine.lane import Lane
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.outputs import RequestFailed, StreamItem, Usage
from pagedserve.control_plane.engine.tracked_request import TrackedRequest
from pagedserve.control_plane.errors import PagedServeError

log = structlog.get_logger()


class RequestTable:
    """Every admitted request that has not ended, by id, and the ways one ends: it finishes (its last chunk carries
    the usage), it fails (its stream ends with the error), it is aborted, or it is cut (every open completion ends
    with ABORT, as a finish does).

    Invariants: a request leaves the table once, when it ends, whichever way; wait_until_empty() returns as soon as
    the last one left.
    """

    def __init__(self, metrics: EngineMetrics, log_requests: bool) -> None:
        self._metrics = metrics
        self._log_requests = log_requests  # the INFO lines of each request's admission and end
        self._requests: dict[str, TrackedRequest] = {}
        self._drained: asyncio.Event | None = None  # set when the last request ends, while wait_until_empty waits

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> TrackedRequest | None:
        return self._requests.get(request_id)

    def ids(self) -> list[str]:
        return list(self._requests)

    def ids_on(self, lane: Lane) -> list[str]:
        """The ids of the requests admitted to lane, in admission order."""
        return [request_id for request_id, tracked in self._requests.items() if tracked.lane is lane]

    def add(self, tracked: TrackedRequest) -> None:
        request = tracked.request
        self._requests[request.request_id] = tracked
        if self._log_requests:
            params = request.sampling_params
            log.info("request_admitted", request_id=request.request_id, worker_id=tracked.lane.worker_id,
                     num_prompt_tokens=request.num_prompt_tokens, n=params.n, max_tokens=params.max_tokens)

    async def wait_until_empty(self, timeout_s: float) -> None:
        """Returns when no request is left, or after timeout_s."""
        if not self._requests or timeout_s <= 0:
            return
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._drained = None

    def abort(self, request_id: str) -> None:
        """Ends the request now and frees its blocks; a no-op once it has finished."""
        tracked = self._forget(request_id)
        if tracked is None:
            return
        if not tracked.is_finished:
            tracked.lane.scheduler.abort_request(request_id)
            tracked.lane.wakeup.set()
            if self._log_requests:
                log.info("request_aborted", request_id=request_id)
            self._metrics.request_aborted()

    def fail(self, request_id: str, error: PagedServeError) -> None:
        """Ends the request's stream with the error; its blocks are freed by the caller, or were."""
        tracked = self._forget(request_id)
        if tracked is not None:
            tracked.channel.put(RequestFailed(request_id, error))

    def end_all_now(self) -> None:
        """Ends every request as a finish does, every open completion with ABORT: a last chunk each, then usage."""
        for tracked in list(self._requests.values()):
            tracked.lane.scheduler.abort_request(tracked.request.request_id)
            tracked.lane.wakeup.set()
            last = tracked.abort_open_completions()
            usage = self.finish(tracked)
            for i, chunk in enumerate(last):
                tracked.channel.put(StreamItem(chunk, usage if i == len(last) - 1 else None))

    def finish(self, tracked: TrackedRequest) -> Usage:
        """Ends the request whose every completion finished: records its metrics and returns the usage that its
        very last chunk carries."""
        request = tracked.request
        self._forget(request.request_id)
        usage = tracked.usage()
        reasons = [c.finish_reason for c in tracked.completions]
        self._metrics.request_ended(reasons, tracked.record(time.monotonic()))
        if self._log_requests:
            log.info("request_finished", request_id=request.request_id,
                     finish_reasons=[r.name for r in reasons if r is not None],
                     num_completion_tokens=usage.completion_tokens)
        return usage

    def _forget(self, request_id: str) -> TrackedRequest | None:
        tracked = self._requests.pop(request_id, None)
        if self._drained is not None and not self._requests:
            self._drained.set()
        return tracked
