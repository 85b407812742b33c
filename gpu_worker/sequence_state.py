"""Per-sequence state the worker keeps between steps, and the registry that applies a step's changes to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import Fork, NewSequence, ScheduledSequence, StepPlan
from pagedserve.gpu_worker.bad_words import BadWordsTokenizer
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.errors import InvalidStepError
from pagedserve.gpu_worker.grammar import GrammarCompiler, SequenceGrammar, accept_tokens
from pagedserve.gpu_worker.sampler import SamplingRow

# An output token sampled by a step whose results have not reached the host yet. It is always the
# sequence's last token and its only uncomputed one, so a step that computes it reads it on the device
# (from the model runner's last-token buffer, at the sequence's table row).
PENDING_TOKEN = -1


@dataclass(slots=True)
class SequenceState:
    """One sequence's known tokens, progress, and the row of its block table in the registry's BlockTableArray.

    Known tokens are prompt + outputs; KV exists for the first num_computed_tokens of them:
        |<------------- prompt ------------>|<--- outputs --->|
        |<---- computed ---->|<- scheduled ->|                 |
    A step computes [num_computed, num_computed + n); reaching num_tokens means a new token is sampled.
    Progress and the sampled token's place (PENDING_TOKEN) are recorded when a step is launched; the
    token's value when its results reach the host.
    """

    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    banned_token_ids: tuple[int, ...]
    table_row: int
    num_computed_tokens: int
    sample_index: int = 0
    forks: tuple[Fork, ...] = ()  # siblings still to be forked at the first sample
    grammar: SequenceGrammar | None = None  # structured output: has accepted every output token on the host
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # Whether sampling this sequence reads its earlier output tokens' values on the host.
    reads_token_history: bool = field(init=False)
    # Its row of every step's sampling batch, built once: it holds the live output list.
    sampling_row: SamplingRow = field(init=False)
    # The grammars of the siblings in forks, copied now, when the step that adds the sequence is applied: before any
    # of its masks is filled (the engine refuses to copy a matcher while a fill holds it).
    _sibling_grammars: dict[int, SequenceGrammar] = field(init=False)

    def __post_init__(self) -> None:
        self.reads_token_history = (self.sampling_params.has_penalties or self.grammar is not None
                                    or bool(self.bad_words_token_ids))
        self.sampling_row = SamplingRow.of(
            self.sampling_params, self.banned_token_ids, self.prompt_token_ids, self.output_token_ids,
            self.sample_index, self.grammar, self.bad_words_token_ids,
        )
        grammar = self.grammar
        self._sibling_grammars = {} if grammar is None else {fork.seq_id: grammar.fork(fork.seq_id)
                                                              for fork in self.forks}

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end), which may straddle the prompt/output boundary."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def token_id(self, position: int) -> int:
        """The known token at position."""
        num_prompt = len(self.prompt_token_ids)
        if position < num_prompt:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - num_prompt]

    def fork(self, seq_id: int, sample_index: int, table_row: int) -> SequenceState:
        """Sibling seq_id (one of forks): sharing this state so far, with its own outputs, table row (a copy of this
        one's) and grammar (copied when this state was made)."""
        return SequenceState(
            seq_id, self.prompt_token_ids, list(self.output_token_ids), self.sampling_params, self.banned_token_ids,
            table_row, self.num_computed_tokens, sample_index, (),
            None if self.grammar is None else self._sibling_grammars.pop(seq_id), self.bad_words_token_ids,
        )


class PendingToken(NamedTuple):
    """Where a launched step's sampled token goes once it reaches the host: state.output_token_ids[output_index]."""

    state: SequenceState
    output_index: int


class ScheduledWork(NamedTuple):
    """A sequence to compute tokens [start, end) of in this step, fixed when the step is applied.

    is_sampling: the step computes the last known token, so a new one is sampled.
    """

    state: SequenceState
    num_scheduled_tokens: int
    end: int
    is_sampling: bool

    @classmethod
    def of(cls, state: SequenceState, num_scheduled_tokens: int) -> ScheduledWork:
        end = state.num_computed_tokens + num_scheduled_tokens
        return cls(state, num_scheduled_tokens, end, num_scheduled_tokens > 0 and end == state.num_tokens)


@dataclass(slots=True)
class SequenceRegistry:
    """All sequences the worker holds, by seq_id. Validates a whole step before changing anything."""

    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    grammars: GrammarCompiler | None = None  # None: the model has no tokenizer, so no structured output
    bad_words: BadWordsTokenizer | None = None  # None: no tokenizer, so no bad_words
    states: dict[int, SequenceState] = field(default_factory=dict)
    tables: BlockTableArray = field(default_factory=BlockTableArray)

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables.row(self.states[seq_id].table_row)

    def validate(self, step: StepPlan) -> None:
        """Raises InvalidStepError naming a bad value; the registry is left untouched."""
        _check_blocks("swap_out", step.swap_out, self.num_gpu_blocks, self.num_cpu_blocks)
        _check_blocks("swap_in", step.swap_in, self.num_cpu_blocks, self.num_gpu_blocks)
        _check_blocks("block_copies", step.block_copies, self.num_gpu_blocks, self.num_gpu_blocks)
        states = self.states
        dropped: set[int] = set()
        for seq_id in step.dropped_seq_ids:
            if seq_id not in states or seq_id in dropped:
                raise InvalidStepError(f"dropped_seq_ids names unknown sequence {seq_id}")
            dropped.add(seq_id)
        added: set[int] = set()  # new sequences and their siblings
        new_ids: set[int] = set()
        for new in step.new_sequences:
            new_ids.add(new.seq_id)
            for seq_id in (new.seq_id, *new.fork_seq_ids):
                if (seq_id in states and seq_id not in dropped) or seq_id in added:
                    raise InvalidStepError(f"new sequence {seq_id} is already held by the worker")
                added.add(seq_id)
            self._check_new(new)
        scheduled_ids = set(new_ids)
        # A sequence with no table update (most of a decode step) is checked here in two comparisons, its table's
        # length for all of them at once after the loop; the full check, with its messages, runs for the others
        # and for the first that fails.
        plain: list[tuple[ScheduledSequence, SequenceState]] = []
        rows, ends = [], []
        for scheduled in step.scheduled_sequences:
            seq_id = scheduled.seq_id
            state = states.get(seq_id)
            if state is None or seq_id in dropped or seq_id in scheduled_ids:
                raise InvalidStepError(f"scheduled sequence {seq_id} is unknown or scheduled twice")
            scheduled_ids.add(seq_id)
            end = state.num_computed_tokens + scheduled.num_scheduled_tokens
            if scheduled.block_table_updates or end > len(state.prompt_token_ids) + len(state.output_token_ids):
                self._check_scheduled(scheduled, state)
            else:
                plain.append((scheduled, state))
                rows.append(state.table_row)
                ends.append(end)
        if plain:
            short = np.flatnonzero(self.tables.lengths[rows] * self.block_size < np.array(ends, dtype=np.int64))
            if len(short):
                self._check_scheduled(*plain[int(short[0])])

    def apply(self, step: StepPlan) -> list[ScheduledWork]:
        """Drops, adds and updates sequences as the (validated) step says; returns the work in step order."""
        for seq_id in step.dropped_seq_ids:
            self.tables.free(self.states.pop(seq_id).table_row)
        work = []
        for new in step.new_sequences:
            state = SequenceState(
                new.seq_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params,
                new.banned_token_ids, self.tables.add(new.block_ids), new.num_computed_tokens, new.sample_index,
                new.forks, self._grammar(new), self._bad_words_token_ids(new),
            )
            self.states[new.seq_id] = state
            work.append(ScheduledWork.of(state, new.num_scheduled_tokens))
        states, tables = self.states, self.tables
        for seq_id, num_scheduled, updates in step.scheduled_sequences:
            state = states[seq_id]
            for update in updates:
                tables.update(state.table_row, update.start_index, update.block_ids)
            work.append(ScheduledWork.of(state, num_scheduled))
        return work

    def reserve(self, work: list[ScheduledWork]) -> list[PendingToken]:
        """Records a launched step: advances computed counts and, for each sampling sequence and then each of its
        siblings (forked now, at the first sample), appends a PENDING_TOKEN; returns them in that order."""
        pending = []
        for state, _, end, is_sampling in work:
            state.num_computed_tokens = end
            if not is_sampling:
                continue
            outputs = state.output_token_ids
            outputs.append(PENDING_TOKEN)
            pending.append(PendingToken(state, len(outputs) - 1))
            if state.forks:
                pending.extend(self._fork_at_first_sample(state))
        return pending

    def _fork_at_first_sample(self, state: SequenceState) -> list[PendingToken]:
        """The siblings of state, forked after its pending token was appended. A first sample has no pending
        token before it, so each sibling copies known outputs plus that last placeholder, which becomes its own."""
        pending = []
        for sibling_id, sample_index in state.forks:
            sibling = state.fork(sibling_id, sample_index, self.tables.copy_row(state.table_row))
            self.states[sibling_id] = sibling
            pending.append(PendingToken(sibling, len(sibling.output_token_ids) - 1))
        state.forks = ()
        return pending

    def fill(self, pending: list[PendingToken], token_ids: list[int], no_choice: frozenset[int] = frozenset()) -> None:
        """Writes a launched step's sampled tokens (in reserve()'s order) over their placeholders, and feeds them
        to their sequences' grammars, all at once (steps are filled in launch order, so each grammar sees its
        tokens in order). A slot in no_choice had no token its constraints allow: its stand-in is written (the
        device reads it as the next input) but no grammar is fed it; its sequence ends with that step's result."""
        accepted = []
        for index, (slot, token_id) in enumerate(zip(pending, token_ids, strict=True)):
            slot.state.output_token_ids[slot.output_index] = token_id
            if slot.state.grammar is not None and index not in no_choice:
                accepted.append((slot.state.grammar, token_id))
        if accepted and self.grammars is not None:
            accept_tokens(self.grammars, accepted)

    def _grammar(self, new: NewSequence) -> SequenceGrammar | None:
        """The new sequence's grammar, compiling off this thread, with the outputs it already has accepted (a
        sequence recomputed after preemption replays them)."""
        output = new.sampling_params.structured_output
        if output is None or self.grammars is None:
            return None
        grammar = self.grammars.start(output, new.seq_id)
        for token_id in new.output_token_ids:
            grammar.accept(token_id)
        return grammar

    def _bad_words_token_ids(self, new: NewSequence) -> tuple[tuple[int, ...], ...]:
        words = new.sampling_params.bad_words
        return self.bad_words.token_ids(words) if words and self.bad_words is not None else ()

    def _check_new(self, new: NewSequence) -> None:
        if not new.prompt_token_ids:
            raise InvalidStepError(f"sequence {new.seq_id} has an empty prompt")
        params = new.sampling_params
        if params.structured_output is not None and self.grammars is None:
            raise InvalidStepError("structured_output: this worker's model directory has no tokenizer.json")
        if params.bad_words and self.bad_words is None:
            raise InvalidStepError("bad_words: this worker's model directory has no tokenizer.json")
        num_tokens = len(new.prompt_token_ids) + len(new.output_token_ids)
        self._check_range(new.seq_id, new.num_computed_tokens, new.num_scheduled_tokens, num_tokens)
        self._check_table(new.seq_id, new.block_ids, new.num_computed_tokens + new.num_scheduled_tokens)

    def _check_scheduled(self, scheduled: ScheduledSequence, state: SequenceState) -> None:
        self._check_range(scheduled.seq_id, state.num_computed_tokens, scheduled.num_scheduled_tokens, state.num_tokens)
        table_length = int(self.tables.lengths[state.table_row])
        for update in scheduled.block_table_updates:
            if update.start_index > table_length:
                raise InvalidStepError(
                    f"sequence {scheduled.seq_id}: table update at {update.start_index} leaves a gap "
                    f"after {table_length} blocks"
                )
            self._check_table(scheduled.seq_id, update.block_ids, 0)
            table_length = max(table_length, update.start_index + len(update.block_ids))
        needed = -(-(state.num_computed_tokens + scheduled.num_scheduled_tokens) // self.block_size)
        if table_length < needed:
            raise InvalidStepError(f"sequence {scheduled.seq_id} has {table_length} blocks, needs {needed}")

    def _check_range(self, seq_id: int, num_computed: int, num_scheduled: int, num_tokens: int) -> None:
        if num_computed + num_scheduled > num_tokens:
            raise InvalidStepError(
                f"sequence {seq_id}: {num_computed} computed + {num_scheduled} scheduled tokens "
                f"exceed its {num_tokens} known tokens"
            )

    def _check_table(self, seq_id: int, block_ids: tuple[int, ...], num_tokens: int) -> None:
        bad = [b for b in block_ids if b >= self.num_gpu_blocks]
        if bad:
            raise InvalidStepError(f"sequence {seq_id}: block id {bad[0]} out of range [0, {self.num_gpu_blocks})")
        needed = -(-num_tokens // self.block_size)
        if len(block_ids) < needed:
            raise InvalidStepError(f"sequence {seq_id} has {len(block_ids)} blocks, needs {needed}")


def _check_blocks(field_name: str, mapping: tuple[tuple[int, int], ...], num_src: int, num_dst: int) -> None:
    for src, dst in mapping:
        if not (0 <= src < num_src and 0 <= dst < num_dst):
            raise InvalidStepError(
                f"{field_name}: block pair ({src}, {dst}) out of range ([0, {num_src}), [0, {num_dst}))"
            )
