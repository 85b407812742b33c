"""One admitted request as the engine tracks it: its lane, its completions' streams, when its tokens came."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.control_plane.engine.lane import Lane
from pagedserve.control_plane.engine.metrics import EngineMetrics, RequestRecord
from pagedserve.control_plane.engine.outputs import EngineOutput, Usage
from pagedserve.control_plane.relay.item_channel import ItemChannel
from pagedserve.control_plane.scheduling.request import FinishReason, Request, SequenceDelta
from pagedserve.control_plane.text.completion import CompletionChunk, CompletionStream


@dataclass(slots=True)
class TrackedRequest:
    """Engine-side state of one admitted request, from admission until its stream ends.

    Invariants: completions[i] streams the request's sequence i; first_token_time_s is when its first tokens
    arrived and last_token_time_s when its latest did (both None before any); is_finished once every completion
    finished, after which none emits a chunk.
    """

    request: Request
    lane: Lane
    completions: list[CompletionStream]
    channel: ItemChannel[EngineOutput]  # the request's own, or shared with other requests
    final_only: bool = False  # the consumer wants the whole result: wake it when the request ends, not per step
    first_token_time_s: float | None = None
    last_token_time_s: float | None = None
    worker_failures: int = 0  # failures of the workers it ran on that it rode through (EngineConfig)

    @property
    def is_finished(self) -> bool:
        return all(c.is_finished for c in self.completions)

    def observe_tokens(self, num_tokens: int, gaps: TokenGaps, metrics: EngineMetrics) -> None:
        """Records num_tokens arriving at gaps.now: the first ones as time to first token, later ones as
        inter-token latency (added to gaps)."""
        if num_tokens == 0:
            return
        now = gaps.now
        if self.first_token_time_s is None:
            self.first_token_time_s = now
            metrics.observe_ttft(now - self.request.arrival_time_s)
        elif self.last_token_time_s is not None:
            gaps.add(self.last_token_time_s, num_tokens)
        self.last_token_time_s = now

    def record(self, end_s: float) -> RequestRecord:
        """The request's figures for its request-level metrics, as it ends at end_s."""
        request = self.request
        max_tokens = request.sampling_params.max_tokens
        max_model_len = self.lane.scheduler.config.max_model_len
        if max_tokens is None and max_model_len is not None:
            max_tokens = max_model_len - request.num_prompt_tokens
        return RequestRecord(
            arrival_s=request.arrival_time_s, first_scheduled_s=request.first_scheduled_time_s,
            first_token_s=self.first_token_time_s, last_token_s=self.last_token_time_s, end_s=end_s,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generation_tokens=sum(c.num_tokens for c in self.completions),
            n=request.sampling_params.n, max_tokens=max_tokens,
        )

    def abort_open_completions(self) -> list[CompletionChunk]:
        """Finishes every open completion with ABORT; returns the last chunks they emit, in completion order."""
        request_id = self.request.request_id
        chunks = [
            completion.apply(SequenceDelta(request_id, completion.index, (), (), (), FinishReason.ABORT))
            for completion in self.completions if not completion.is_finished
        ]
        return [chunk for chunk in chunks if chunk is not None]

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(c.num_tokens for c in self.completions),
            cached_prompt_tokens=self.request.num_cached_tokens,
        )


class TokenGaps:
    """The inter-token latencies of one step's tokens, all arriving at now, counted per (previous arrival, tokens):
    the requests of a batch mostly had their previous tokens in the same step, so the histogram takes a few
    observations with counts instead of one per request."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._counts: dict[tuple[float, int], int] = {}

    def add(self, previous_s: float, num_tokens: int) -> None:
        """num_tokens arrived at now, the request's previous ones at previous_s."""
        key = (previous_s, num_tokens)
        self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, metrics: EngineMetrics) -> None:
        for (previous_s, num_tokens), count in self._counts.items():
            metrics.observe_itl((self.now - previous_s) / num_tokens, num_tokens * count)
