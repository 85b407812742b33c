"""The scheduler's decision for one engine step, and what the workers report back (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class WorkerSampling:
    """The part of a request's sampling parameters a worker applies to logits."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    banned_token_ids: tuple[int, ...] = ()  # EOS and stop token ids, banned until min_tokens
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class BlockTableUpdate(NamedTuple):
    """table[start_index : start_index + len(block_ids)] = block_ids; appends start at len(table)."""

    start_index: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NewSequencePlan:
    """A sequence the worker has not seen (or forgot after a recompute preemption), sent in full."""

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: WorkerSampling
    block_ids: tuple[int, ...]
    num_computed_tokens: int  # tokens whose KV is already cached (prefix hits)
    num_scheduled_tokens: int  # tokens computed this step, from num_computed_tokens on
    fork_seq_ids: tuple[int, ...] = ()  # n > 1: siblings forked when the prompt is done
    sample_index: int = 0


class ScheduledSequencePlan(NamedTuple):
    """A sequence the worker holds, scheduled again; only what changed since its last step."""

    seq_id: int
    num_scheduled_tokens: int
    block_table_updates: tuple[BlockTableUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One engine step for one worker. Order of effects: drop, swap out, swap in, copy, compute."""

    step_id: int
    dropped_seq_ids: tuple[int, ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()  # (device block, cpu block)
    swap_in: tuple[tuple[int, int], ...] = ()  # (cpu block, device block)
    block_copies: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)
    new_sequences: tuple[NewSequencePlan, ...] = ()
    scheduled_sequences: tuple[ScheduledSequencePlan, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.new_sequences) + sum(
            s.num_scheduled_tokens for s in self.scheduled_sequences
        )

    @property
    def is_empty(self) -> bool:
        return not (
            self.dropped_seq_ids
            or self.swap_out
            or self.swap_in
            or self.block_copies
            or self.new_sequences
            or self.scheduled_sequences
        )


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token's and the top alternatives, best first."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class SequenceOutput(NamedTuple):
    """What one sequence produced in one step: a sampled token when its known tokens were all computed."""

    seq_id: int
    token_id: int | None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True, slots=True)
class StepOutput:
    """A worker's answer to one StepPlan."""

    step_id: int
    outputs: tuple[SequenceOutput, ...] = ()
    step_time_ms: float = 0.0
    forward_time_ms: float = 0.0
    idle_time_ms: float = 0.0  # the worker's wait between its previous forward pass and this one
    by_seq_id: dict[int, SequenceOutput] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.by_seq_id.update({o.seq_id: o for o in self.outputs})
