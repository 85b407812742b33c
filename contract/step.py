"""One engine step as the control plane plans it and the worker applies it, and what the worker answers.

The control plane sends a StepPlan per step and per worker; the worker answers each with a StepResult. Both
are plain frozen data: contract/codec.py is their one wire form, and an in-process worker takes them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pagedserve.contract.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probability of one token under the raw logits, its rank (1 = best) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 + number of tokens with a strictly greater logprob
    top_token_ids: tuple[int, ...] = ()  # best first
    top_logprobs: tuple[float, ...] = ()


class BlockTableUpdate(NamedTuple):
    """table[start_index : start_index + len(block_ids)] = block_ids, growing the table as needed.

    Appends start at len(table); copy-on-write replaces one entry; a swap-in rewrites the table from 0.
    """

    start_index: int
    block_ids: tuple[int, ...]


class Fork(NamedTuple):
    """A sibling of an n > 1 request, forked from its first sequence when the prompt is done."""

    seq_id: int
    sample_index: int


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence the worker has not seen (or forgot after a recompute preemption), sent in full once.

        tokens:  | prompt ............ | outputs ..... |
                 0     num_computed_tokens ^   + num_scheduled_tokens computed this step
    """

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling_params: SamplingParams  # prompt_logprobs is None unless this admission still owes them
    block_ids: tuple[int, ...]
    num_computed_tokens: int  # tokens whose KV is already cached (prefix hits)
    num_scheduled_tokens: int  # tokens computed this step, from num_computed_tokens on
    banned_token_ids: tuple[int, ...] = ()  # EOS and stop token ids, unsampleable before min_tokens outputs
    fork_seq_ids: tuple[int, ...] = ()  # n > 1: siblings forked when the prompt is done
    sample_index: int = 0  # place among the request's n completions (seeded streams differ by it)

    @property
    def forks(self) -> tuple[Fork, ...]:
        """The siblings to fork at the first sample: sibling i takes sample index sample_index + 1 + i."""
        return tuple(Fork(seq_id, self.sample_index + 1 + i) for i, seq_id in enumerate(self.fork_seq_ids))


class ScheduledSequence(NamedTuple):
    """A sequence the worker holds, scheduled again: only what changed since its last step."""

    seq_id: int
    num_scheduled_tokens: int
    block_table_updates: tuple[BlockTableUpdate, ...] = ()

    @property
    def is_plain_decode(self) -> bool:
        """One token and no table update: the usual decode, which the wire packs (codec.step_plan_to_proto)."""
        return self.num_scheduled_tokens == 1 and not self.block_table_updates


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One engine step for one worker. Effects in order: drop, swap out, swap in, copy blocks, add new
    sequences, update tables, compute."""

    step_id: int
    dropped_seq_ids: tuple[int, ...] = ()  # finished, aborted, or preempted by recompute
    swap_out: tuple[tuple[int, int], ...] = ()  # (device block, cpu block)
    swap_in: tuple[tuple[int, int], ...] = ()  # (cpu block, device block)
    block_copies: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)
    new_sequences: tuple[NewSequence, ...] = ()
    scheduled_sequences: tuple[ScheduledSequence, ...] = ()

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


class SequenceFailure(NamedTuple):
    """Why the worker cannot go on with one sequence: a sampling parameter of its request it cannot honour (a
    constraint its grammar engine cannot compile). The request fails with INVALID_ARGUMENT naming the field."""

    field: str  # as the public API names it, e.g. "structured_output"
    message: str


class SequenceOutput(NamedTuple):
    """What one sequence produced in one step: a token when the step reached the end of its known tokens, or a
    failure instead of it (the token sampled meanwhile is never delivered)."""

    seq_id: int
    token_id: int | None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    failure: SequenceFailure | None = None


@dataclass(frozen=True, slots=True)
class StepResult:
    """A worker's answer to one StepPlan: one output per scheduled sequence and per forked sibling."""

    step_id: int
    outputs: tuple[SequenceOutput, ...] = ()
    step_time_ms: float = 0.0  # the worker's host time for the step: launch plus reading its tokens, two threads
    forward_time_ms: float = 0.0  # device time of its forward pass and sampling
    idle_time_ms: float = 0.0  # the device's wait between the previous step's forward pass and this one's
    by_seq_id: dict[int, SequenceOutput] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_seq_id.update({o.seq_id: o for o in self.outputs})
