"""A request and its sequences as the scheduler tracks them: tokens, progress, status and finish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import SequenceFailure, TokenLogprobs


class FinishReason(str, enum.Enum):
    """Why a sequence ended; equal to its value, the string vLLM's outputs carry (`finish_reason == "length"`)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # cancelled by the client or the server


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never run
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; queued to be recomputed
    SWAPPED = "swapped"  # blocks on the CPU; resumes before new requests are admitted
    FINISHED = "finished"  # every sequence finished on its own
    ABORTED = "aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.ABORTED}),
    RequestStatus.RUNNING: frozenset(
        {RequestStatus.PREEMPTED, RequestStatus.SWAPPED, RequestStatus.FINISHED, RequestStatus.ABORTED}
    ),
    # A stop string can match downstream in tokens delivered before a preemption.
    RequestStatus.PREEMPTED: frozenset({RequestStatus.RUNNING, RequestStatus.FINISHED, RequestStatus.ABORTED}),
    # A swapped request still receives the tokens of steps planned before it was swapped out; one whose worker
    # failed is recomputed on another (Scheduler.adopt).
    RequestStatus.SWAPPED: frozenset(
        {RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.FINISHED, RequestStatus.ABORTED}
    ),
    RequestStatus.FINISHED: frozenset(),
    RequestStatus.ABORTED: frozenset(),
}


class SequenceDelta(NamedTuple):
    """What one sequence of a request gained in one step."""

    request_id: str
    completion_index: int  # the sequence's index among the request's n (not `index`: tuple.index)
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    prompt_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: FinishReason | None
    stop_token_id: int | None = None  # the EOS / stop token id that finished it
    failure: SequenceFailure | None = None  # the worker could not go on: the whole request ended with it (ABORT)


@dataclass(slots=True)
class Sequence:
    """One of a request's n completions.

        tokens:  | prompt ............ | outputs ..... | pending |
                 0        num_computed_tokens ^                 ^ num_tokens

    num_computed_tokens counts tokens whose KV is computed or scheduled to be; pending tokens are sampled
    by scheduled steps whose results have not arrived (the worker knows them, the scheduler not yet).
    """

    seq_id: int
    index: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    is_forked: bool = True  # False for siblings waiting for the first sequence's prompt to finish
    is_on_worker: bool = False  # the worker holds (or, once a planned fork runs, will hold) its state
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    """A prompt with its sampling parameters and n sequences; status changes only through set_status."""

    # Slotted: the scheduler reads a few fields of every running request at every step.
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "eos_token_ids", "arrival_time_s", "priority",
                 "status", "sequences", "num_cached_tokens", "first_scheduled_time_s", "is_prompt_done",
                 "num_prompt_logprobs_delivered", "num_prompt_logprobs_to_skip")

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        arrival_time_s: float,
        priority: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time_s = arrival_time_s
        self.priority = priority
        self.status = RequestStatus.WAITING
        self.sequences: list[Sequence] = []
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.first_scheduled_time_s: float | None = None  # time.monotonic() at first admission
        self.is_prompt_done = False  # the prompt's last position was computed once (first token sampled)
        self.num_prompt_logprobs_delivered = 0
        self.num_prompt_logprobs_to_skip = 0  # already delivered, computed again after a preemption

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.status.name}, prompt={len(self.prompt_token_ids)} tokens)"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def unfinished_sequences(self) -> list[Sequence]:
        return [s for s in self.sequences if not s.is_finished]

    @property
    def live_sequences(self) -> list[Sequence]:
        """Unfinished sequences that hold (or will hold) their own block table."""
        return [s for s in self.sequences if not s.is_finished and s.is_forked]

    @property
    def num_seqs_reserved(self) -> int:
        """Sequences this request counts against max_num_seqs: unforked siblings included."""
        sequences = self.sequences
        if len(sequences) == 1:  # the common case, counted once per running request and step
            return 0 if sequences[0].finish_reason is not None else 1
        return len(self.unfinished_sequences)

    def tokens(self, seq: Sequence) -> tuple[int, ...]:
        """The sequence's known tokens: prompt then outputs."""
        return self.prompt_token_ids + tuple(seq.output_token_ids)

    def num_tokens(self, seq: Sequence) -> int:
        return len(self.prompt_token_ids) + len(seq.output_token_ids) + seq.num_pending_tokens

    def set_status(self, status: RequestStatus) -> None:
        if status not in _TRANSITIONS[self.status]:
            raise ValueError(f"request {self.request_id}: no transition {self.status.name} -> {status.name}")
        self.status = status


def banned_token_ids(request: Request) -> tuple[int, ...]:
    """EOS and stop token ids, which the worker keeps from being sampled until min_tokens outputs exist."""
    params = request.sampling_params
    if params.min_tokens == 0:
        return ()
    banned = () if params.ignore_eos else request.eos_token_ids
    return banned + tuple(t for t in params.stop_token_ids if t not in banned)


def check_stop(
    request: Request, seq: Sequence, max_model_len: int | None
) -> tuple[FinishReason, int | None] | None:
    """Why seq ends after its latest token, if it does: a stop token (once min_tokens are out), else a length.

    A stop token ranks before a length limit reached by the same token: the model chose to end there.
    """
    params = request.sampling_params
    num_outputs = len(seq.output_token_ids)
    token_id = seq.output_token_ids[-1]
    if num_outputs >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return FinishReason.STOP, token_id
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
    if params.max_tokens is not None and num_outputs >= params.max_tokens:
        return FinishReason.LENGTH, None
    if max_model_len is not None and len(request.prompt_token_ids) + num_outputs >= max_model_len:
        return FinishReason.LENGTH, None
    return None
