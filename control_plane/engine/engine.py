"""The engine loop: per worker, schedule a step, send it, apply its result, stream the outputs."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import structlog

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.errors import NotFoundError, PagedServeError, WorkerUnavailableError
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.request import FinishReason, Request, SequenceDelta
from pagedserve.control_plane.scheduling.scheduler import Scheduler, SchedulerStats
from pagedserve.control_plane.text.completion import CompletionChunk, CompletionStream
from pagedserve.control_plane.text.tokenizer import Tokenizer

log = structlog.get_logger()


class StepTransport(Protocol):
    """Carries plans to one worker and its results back, in order."""

    async def send(self, plan: StepPlan) -> None: ...

    async def receive(self) -> StepResult: ...


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


class StreamItem(NamedTuple):
    """One chunk of a request's stream; usage is set on the request's very last chunk."""

    chunk: CompletionChunk
    usage: Usage | None = None


class RequestFailed(NamedTuple):
    """The end of a request's stream when the engine cannot finish it (its worker failed)."""

    request_id: str
    error: PagedServeError


EngineOutput = StreamItem | RequestFailed


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one admitted request."""

    request: Request
    lane: _Lane
    completions: list[CompletionStream]
    channel: ItemChannel[EngineOutput]  # the request's own, or shared with other requests
    final_only: bool = False  # the consumer wants the whole result: wake it when the request ends, not per step
    first_token_time_s: float | None = None
    last_token_time_s: float | None = None

    @property
    def is_finished(self) -> bool:
        return all(c.is_finished for c in self.completions)


@dataclass(slots=True)
class _Lane:
    """One worker with its scheduler (the worker's global block tables) and its loop."""

    worker_id: str
    scheduler: Scheduler
    transport: StepTransport
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class EngineStatus:
    num_requests_running: int
    num_requests_waiting: int
    num_requests_swapped: int
    num_used_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_steps: int
    control_plane_step_time_s: float
    worker_step_time_s: float
    worker_forward_time_s: float
    worker_idle_time_s: float


class StepRecord(NamedTuple):
    """One step as its lane saw it: its size, the control plane's time on it and the worker's report (ms)."""

    step_id: int
    num_seqs: int
    num_tokens: int
    plan_ms: float
    apply_ms: float
    received_s: float  # time.perf_counter() when the result arrived
    worker_host_ms: float
    device_ms: float
    idle_ms: float  # 0 for the first step after the lane ran out of work (the device waited for work, not us)


RECENT_STEPS = 16384  # step records kept, newest last (a few MB)


@dataclass(slots=True)
class _StepTimes:
    """Where the time of the steps went, summed since start (seconds)."""

    control_plane_s: float = 0.0
    worker_step_s: float = 0.0
    worker_forward_s: float = 0.0
    worker_idle_s: float = 0.0

    def add_output(self, output: StepResult, counts_idle: bool) -> None:
        """counts_idle: the device's wait before this step was the pipeline's (not a wait for requests)."""
        self.worker_step_s += output.step_time_ms / 1e3
        self.worker_forward_s += output.forward_time_ms / 1e3
        if counts_idle:
            self.worker_idle_s += output.idle_time_ms / 1e3


class Engine:
    """Owns every admitted request until its stream ends. Each worker lane keeps up to
    config.max_steps_in_flight steps outstanding: steps N+1 onwards are planned while the worker runs step N."""

    def __init__(
        self,
        workers: Sequence[tuple[str, Scheduler, StepTransport]],
        tokenizer: Tokenizer,
        config: EngineConfig,
        metrics: EngineMetrics,
    ) -> None:
        self._lanes = [_Lane(worker_id, scheduler, transport) for worker_id, scheduler, transport in workers]
        self._tokenizer = tokenizer
        self._config = config
        self.metrics = metrics
        metrics.bind_status(self.status)
        self._requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._num_steps = 0
        self._times = _StepTimes()
        self._recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)

    def start(self) -> None:
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"engine-{lane.worker_id}")

    async def stop(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in self._lanes if lane.task), return_exceptions=True)

    def add_request(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        request_id: str = "",
        priority: int = 0,
        final_only: bool = False,
        outputs: ItemChannel[EngineOutput] | None = None,
    ) -> str:
        """Admits a validated request to the least loaded worker; raises ResourceExhaustedError when full.

        final_only: stream() still yields every chunk, but its consumer is woken only when the request ends
        (as vLLM's FINAL_ONLY output kind), which spares an offline caller a task switch per step and request.
        outputs: a channel shared by many requests, whose one consumer is woken once per step for all of them
        (the frontend's relay), instead of the request's own channel that stream() reads.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        while request_id in self._requests:
            request_id = f"{request_id}-{next(self._ids)}"
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_ids=self._tokenizer.eos_token_ids,
            arrival_time_s=time.monotonic(),
            priority=priority,
        )
        lane = min(self._lanes, key=lambda candidate: _load(candidate.scheduler.stats))
        lane.scheduler.add_request(request)
        self._requests[request_id] = _Tracked(
            request=request,
            lane=lane,
            final_only=final_only,
            channel=ItemChannel() if outputs is None else outputs,
            completions=[
                CompletionStream(request_id, index, self._tokenizer, prompt_token_ids, params, text_at_end=final_only)
                for index in range(params.n)
            ],
        )
        log.info("request_admitted", request_id=request_id, worker_id=lane.worker_id,
                 num_prompt_tokens=len(prompt_token_ids), n=params.n, max_tokens=params.max_tokens)
        lane.wakeup.set()
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[StreamItem]:
        """Yields the request's chunks until every completion finished. Leaving early aborts the request."""
        tracked = self._requests.get(request_id)
        if tracked is None:
            raise NotFoundError(f"request_id: unknown request {request_id!r}")
        try:
            while True:
                for item in await tracked.channel.take_all():
                    if isinstance(item, RequestFailed):
                        raise item.error
                    yield item
                    if item.usage is not None:
                        return
        finally:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request now and frees its blocks; a no-op once it has finished."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return
        if not tracked.is_finished:
            tracked.lane.scheduler.abort_request(request_id)
            tracked.lane.wakeup.set()
            log.info("request_aborted", request_id=request_id)
            self.metrics.request_ended([FinishReason.ABORT], e2e_s=None)

    def status(self) -> EngineStatus:
        stats = [lane.scheduler.stats for lane in self._lanes]
        return EngineStatus(
            num_requests_running=sum(s.num_running for s in stats),
            num_requests_waiting=sum(s.num_waiting for s in stats),
            num_requests_swapped=sum(s.num_swapped for s in stats),
            num_used_blocks=sum(s.num_used_blocks for s in stats),
            num_total_blocks=sum(s.num_total_blocks for s in stats),
            num_preemptions=sum(s.num_preemptions for s in stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
            num_prompt_tokens=sum(s.num_prompt_tokens for s in stats),
            num_generation_tokens=sum(s.num_generation_tokens for s in stats),
            num_steps=self._num_steps,
            control_plane_step_time_s=self._times.control_plane_s,
            worker_step_time_s=self._times.worker_step_s,
            worker_forward_time_s=self._times.worker_forward_s,
            worker_idle_time_s=self._times.worker_idle_s,
        )

    def recent_steps(self) -> list[StepRecord]:
        """The last RECENT_STEPS steps of every lane, in the order their results arrived (call it on the loop)."""
        return list(self._recent_steps)

    async def _run_lane(self, lane: _Lane) -> None:
        in_flight: deque[tuple[StepPlan, float]] = deque()  # with its planning time, ms
        # The first step after the lane ran out of work: the device's wait before it was for work, not for us.
        first_after_pause: int | None = None
        is_paused = True
        try:
            while True:
                while len(in_flight) < self._config.max_steps_in_flight:
                    started = time.perf_counter()
                    plan = lane.scheduler.schedule()
                    plan_s = time.perf_counter() - started
                    self._times.control_plane_s += plan_s
                    if plan.is_empty:
                        break
                    await lane.transport.send(plan)
                    in_flight.append((plan, plan_s * 1e3))
                    if is_paused:
                        first_after_pause, is_paused = plan.step_id, False
                if not in_flight:
                    lane.wakeup.clear()
                    await lane.wakeup.wait()
                    is_paused = True
                    continue
                output = await lane.transport.receive()
                started = time.perf_counter()
                self._num_steps += 1
                plan, plan_ms = in_flight.popleft()
                self._apply(lane, lane.scheduler.update_from_output(plan, output))
                apply_s = time.perf_counter() - started
                self._times.control_plane_s += apply_s
                counts_idle = output.step_id != first_after_pause
                self._times.add_output(output, counts_idle)
                self._recent_steps.append(StepRecord(
                    plan.step_id, len(plan.new_sequences) + len(plan.scheduled_sequences), plan.num_scheduled_tokens,
                    plan_ms, apply_s * 1e3, started, output.step_time_ms, output.forward_time_ms,
                    output.idle_time_ms if counts_idle else 0.0,
                ))
        except WorkerUnavailableError as exc:
            log.error("worker_failed", worker_id=lane.worker_id, error=str(exc))
            self._fail_lane(lane, exc)

    def _apply(self, lane: _Lane, deltas: list[SequenceDelta]) -> None:
        now = time.monotonic()
        for delta in deltas:
            tracked = self._requests.get(delta.request_id)
            if tracked is None:
                continue
            completion = tracked.completions[delta.index]
            chunk = completion.apply(delta)
            if completion.is_finished and delta.finish_reason is None:
                lane.scheduler.finish_sequence(delta.request_id, delta.index, FinishReason.STOP)
            if chunk is None:
                continue
            self._observe_tokens(tracked, len(delta.new_token_ids), now)
            usage = self._finish(tracked) if completion.is_finished and tracked.is_finished else None
            tracked.channel.put(StreamItem(chunk, usage), wake=usage is not None or not tracked.final_only)

    def _observe_tokens(self, tracked: _Tracked, num_tokens: int, now: float) -> None:
        if num_tokens == 0:
            return
        if tracked.first_token_time_s is None:
            tracked.first_token_time_s = now
            self.metrics.observe_ttft(now - tracked.request.arrival_time_s)
        elif tracked.last_token_time_s is not None:
            self.metrics.observe_itl((now - tracked.last_token_time_s) / num_tokens, num_tokens)
        tracked.last_token_time_s = now

    def _finish(self, tracked: _Tracked) -> Usage:
        request = tracked.request
        self._requests.pop(request.request_id, None)
        usage = Usage(
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=sum(c.num_tokens for c in tracked.completions),
            cached_prompt_tokens=request.num_cached_tokens,
        )
        reasons = [c.finish_reason for c in tracked.completions]
        self.metrics.request_ended(reasons, e2e_s=time.monotonic() - request.arrival_time_s)
        log.info("request_finished", request_id=request.request_id,
                 finish_reasons=[r.name for r in reasons if r is not None],
                 num_completion_tokens=usage.completion_tokens)
        return usage

    def _fail_lane(self, lane: _Lane, error: WorkerUnavailableError) -> None:
        for request_id, tracked in list(self._requests.items()):
            if tracked.lane is lane:
                self._requests.pop(request_id)
                tracked.channel.put(RequestFailed(request_id, error))


def _load(stats: SchedulerStats) -> int:
    return stats.num_running + stats.num_waiting + stats.num_swapped
