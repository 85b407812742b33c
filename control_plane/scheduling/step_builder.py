"""What one schedule() call has decided so far, and the StepPlan it becomes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from pagedserve.contract.step import BlockTableUpdate, NewSequence, ScheduledSequence, StepPlan
from pagedserve.control_plane.scheduling.block_manager import CachedPrefix
from pagedserve.control_plane.scheduling.request import Request, Sequence, banned_token_ids


class SeqWork(NamedTuple):
    """Tokens one sequence computes this step; prefix is set when the worker does not hold the sequence."""

    seq: Sequence
    num_new_tokens: int
    prefix: CachedPrefix | None

    @property
    def end(self) -> int:
        """Slots the sequence's table must cover after this step."""
        start = self.prefix.num_tokens if self.prefix else self.seq.num_computed_tokens
        return start + self.num_new_tokens


class Expectation(NamedTuple):
    """What a planned step owes one sequence: a sampled token, and first tokens for forked siblings."""

    samples: bool
    fork_seq_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class StepBuilder:
    """One step's decisions: the token budget left, the running sequences counted against max_num_seqs,
    the plan's parts in the order the worker applies them, and what the step owes each sequence."""

    budget: int
    num_seqs: int
    has_preempted: bool = False  # a running request lost its blocks: admit nothing new this step
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    scheduled_sequences: list[ScheduledSequence] = field(default_factory=list)  # all but the plain decodes
    plain_decodes: list[ScheduledSequence] = field(default_factory=list)  # one token, no table update: planned last
    expectations: dict[int, Expectation] = field(default_factory=dict)
    to_cache: list[tuple[Request, Sequence]] = field(default_factory=list)  # scheduled, blocks maybe not all cached

    def add_new(self, request: Request, seq: Sequence, block_ids: tuple[int, ...], num_new: int) -> None:
        """Sends seq in full: its known tokens, table and sampling; the first sequence of an unforked
        request names its siblings, which the worker forks when the prompt is done."""
        forks = tuple(s.seq_id for s in request.sequences if not s.is_forked) if seq.index == 0 else ()
        params = request.sampling_params
        if request.is_prompt_done and params.prompt_logprobs is not None:
            params = replace(params, prompt_logprobs=None)  # delivered with the first admission
        self.new_sequences.append(NewSequence(
            seq_id=seq.seq_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=tuple(seq.output_token_ids),
            sampling_params=params,
            block_ids=block_ids,
            num_computed_tokens=seq.num_computed_tokens,
            num_scheduled_tokens=num_new,
            banned_token_ids=banned_token_ids(request),
            fork_seq_ids=forks,
            sample_index=seq.index,
        ))

    def add_scheduled(self, seq_id: int, num_new: int, update: BlockTableUpdate | None) -> None:
        seq = ScheduledSequence(seq_id, num_new, () if update is None else (update,))
        (self.plain_decodes if seq.is_plain_decode else self.scheduled_sequences).append(seq)

    def record(self, request: Request, seq: Sequence, num_new: int, expectation: Expectation,
               needs_caching: bool = True) -> None:
        """Counts seq's work against the budget; needs_caching: its computed blocks may have grown past its
        cached ones (they go to the prefix cache once every admission of the step is planned)."""
        self.budget -= num_new
        if needs_caching:
            self.to_cache.append((request, seq))
        self.expectations[seq.seq_id] = expectation

    @property
    def is_empty(self) -> bool:
        """Whether the step asks nothing of the worker but, maybe, to drop sequences."""
        return not (self.swap_out or self.swap_in or self.block_copies or self.new_sequences
                    or self.scheduled_sequences or self.plain_decodes)

    def build(self, step_id: int, dropped_seq_ids: list[int]) -> StepPlan:
        return StepPlan(
            step_id=step_id,
            dropped_seq_ids=tuple(dropped_seq_ids),
            swap_out=tuple(self.swap_out),
            swap_in=tuple(self.swap_in),
            block_copies=tuple(self.block_copies),
            new_sequences=tuple(self.new_sequences),
            # Plain decodes last: the wire packs them (codec.step_plan_to_proto).
            scheduled_sequences=(*self.scheduled_sequences, *self.plain_decodes),
        )
