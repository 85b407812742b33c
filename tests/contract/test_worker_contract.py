"""The worker contract, one set of scenarios run against both of its implementations: the real worker's sequence
registry (validate, apply, reserve, fill; no model, CPU only) and the control-plane tests' FakeWorker. Each scenario
asserts the exact state afterwards: which sequences exist, their tokens, tables, progress and sample indices, and
which sequences produced an output."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pytest

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import BlockTableUpdate, NewSequence, ScheduledSequence, StepPlan
from pagedserve.gpu_worker.errors import InvalidStepError
from pagedserve.gpu_worker.sequence_state import SequenceRegistry
from tests.control_plane.factories import FakeWorker, PlanRejectedError, default_next_token

BLOCK_SIZE = 4
NUM_GPU_BLOCKS = 16
NUM_CPU_BLOCKS = 4
PROMPT = (10, 11, 12, 13, 14, 15)  # two blocks, the second half full
GREEDY = SamplingParams(temperature=0.0)

Output = tuple[int, int | None]  # (seq_id, sampled token or None)
SeqState = tuple[list[int], list[int], int, int]  # (prompt + outputs, block table, computed tokens, sample index)


class Rejected(Exception):
    """The implementation refused the whole plan."""


class WorkerUnderTest(Protocol):
    def execute(self, plan: StepPlan) -> list[Output]:
        """Outputs in the worker's order: per scheduled sequence, each followed by the siblings it forked."""

    def state(self) -> dict[int, SeqState]: ...


class RegistryAdapter:
    """The real worker's bookkeeping; sampled tokens come from the fake's token function, so both agree."""

    def __init__(self) -> None:
        self.registry = SequenceRegistry(BLOCK_SIZE, NUM_GPU_BLOCKS, NUM_CPU_BLOCKS)

    def execute(self, plan: StepPlan) -> list[Output]:
        try:
            self.registry.validate(plan)
        except InvalidStepError as error:
            raise Rejected(str(error)) from error
        work = self.registry.apply(plan)
        num_forks = [len(item.state.forks) if item.is_sampling else 0 for item in work]
        pending = self.registry.reserve(work)
        tokens = [
            default_next_token(
                [*slot.state.prompt_token_ids, *slot.state.output_token_ids[: slot.output_index]],
                slot.state.sample_index,
            )
            for slot in pending
        ]
        self.registry.fill(pending, tokens)
        sampled: Iterator[tuple[int, int]] = ((slot.state.seq_id, t) for slot, t in zip(pending, tokens, strict=True))
        outputs: list[Output] = []
        for item, forks in zip(work, num_forks, strict=True):
            if not item.is_sampling:
                outputs.append((item.state.seq_id, None))
                continue
            outputs.extend(next(sampled) for _ in range(1 + forks))
        return outputs

    def state(self) -> dict[int, SeqState]:
        return {
            seq_id: ([*s.prompt_token_ids, *s.output_token_ids], self.registry.block_table(seq_id),
                     s.num_computed_tokens, s.sample_index)
            for seq_id, s in self.registry.states.items()
        }  # fmt: skip


class FakeAdapter:
    """The control-plane tests' FakeWorker, whose KV slots also check every read."""

    def __init__(self) -> None:
        self.worker = FakeWorker(NUM_GPU_BLOCKS, NUM_CPU_BLOCKS, BLOCK_SIZE)

    def execute(self, plan: StepPlan) -> list[Output]:
        try:
            result = self.worker.execute(plan)
        except PlanRejectedError as error:
            raise Rejected(str(error)) from error
        return [(o.seq_id, o.token_id) for o in result.outputs]

    def state(self) -> dict[int, SeqState]:
        return {
            seq_id: (list(s.tokens), list(s.table), s.num_computed, s.sample_index)
            for seq_id, s in self.worker.seqs.items()
        }


@pytest.fixture(params=[RegistryAdapter, FakeAdapter], ids=["registry", "fake"])
def worker(request: pytest.FixtureRequest) -> WorkerUnderTest:
    adapter: type[WorkerUnderTest] = request.param
    return adapter()


def _new(seq_id: int, block_ids: tuple[int, ...], num_scheduled: int = len(PROMPT), **fields: object) -> NewSequence:
    return NewSequence(seq_id, PROMPT, (), GREEDY, block_ids, 0, num_scheduled, **fields)  # type: ignore[arg-type]


def _sampled(tokens: list[int], sample_index: int = 0) -> list[int]:
    """tokens followed by the token the contract's token function samples next."""
    return [*tokens, default_next_token(tokens, sample_index)]


def test_a_new_sequence_is_admitted_and_grows_its_table_by_appends(worker: WorkerUnderTest) -> None:
    assert worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1)),))) == [(1, _sampled(list(PROMPT))[-1])]
    assert worker.state() == {1: (_sampled(list(PROMPT)), [0, 1], 6, 0)}
    worker.execute(StepPlan(1, scheduled_sequences=(ScheduledSequence(1, 1),)))
    tokens = _sampled(_sampled(list(PROMPT)))
    assert worker.state() == {1: (tokens, [0, 1], 7, 0)}
    # Position 8 starts the third block, appended at the table's end.
    outputs = worker.execute(StepPlan(2, scheduled_sequences=(ScheduledSequence(1, 1, (BlockTableUpdate(2, (2,)),)),)))
    assert outputs == [(1, _sampled(tokens)[-1])]
    assert worker.state() == {1: (_sampled(tokens), [0, 1, 2], 8, 0)}


def test_a_prompt_chunked_over_two_steps_samples_only_at_its_end(worker: WorkerUnderTest) -> None:
    assert worker.execute(StepPlan(0, new_sequences=(_new(1, (0,), num_scheduled=4),))) == [(1, None)]
    assert worker.state() == {1: (list(PROMPT), [0], 4, 0)}
    rest = ScheduledSequence(1, 2, (BlockTableUpdate(1, (1,)),))
    assert worker.execute(StepPlan(1, scheduled_sequences=(rest,))) == [(1, _sampled(list(PROMPT))[-1])]
    assert worker.state() == {1: (_sampled(list(PROMPT)), [0, 1], 6, 0)}


def test_siblings_fork_at_the_first_sample_with_the_next_sample_indices_and_a_copy_of_the_table(
    worker: WorkerUnderTest,
) -> None:
    outputs = worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1), fork_seq_ids=(2, 3)),)))
    assert outputs == [(1, _sampled(list(PROMPT), 0)[-1]), (2, _sampled(list(PROMPT), 1)[-1]),
                       (3, _sampled(list(PROMPT), 2)[-1])]  # fmt: skip
    assert worker.state() == {
        1: (_sampled(list(PROMPT), 0), [0, 1], 6, 0),
        2: (_sampled(list(PROMPT), 1), [0, 1], 6, 1),
        3: (_sampled(list(PROMPT), 2), [0, 1], 6, 2),
    }


def test_siblings_of_a_chunked_prompt_appear_only_when_the_prompt_is_done(worker: WorkerUnderTest) -> None:
    assert worker.execute(StepPlan(0, new_sequences=(_new(1, (0,), num_scheduled=4, fork_seq_ids=(2,)),))) == [
        (1, None)
    ]
    assert set(worker.state()) == {1}
    rest = ScheduledSequence(1, 2, (BlockTableUpdate(1, (1,)),))
    outputs = worker.execute(StepPlan(1, scheduled_sequences=(rest,)))
    assert outputs == [(1, _sampled(list(PROMPT), 0)[-1]), (2, _sampled(list(PROMPT), 1)[-1])]
    assert worker.state() == {
        1: (_sampled(list(PROMPT), 0), [0, 1], 6, 0),
        2: (_sampled(list(PROMPT), 1), [0, 1], 6, 1),
    }


def test_copy_on_write_replaces_one_table_entry_after_the_block_copy(worker: WorkerUnderTest) -> None:
    worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1), fork_seq_ids=(2,)),)))
    # Both hold the partly filled block 1; sequence 1 writes position 6 into its own copy, block 4.
    plan = StepPlan(1, block_copies=((1, 4),), scheduled_sequences=(
        ScheduledSequence(1, 1, (BlockTableUpdate(1, (4,)),)), ScheduledSequence(2, 1),
    ))  # fmt: skip
    first, second = _sampled(list(PROMPT), 0), _sampled(list(PROMPT), 1)
    assert worker.execute(plan) == [(1, _sampled(first, 0)[-1]), (2, _sampled(second, 1)[-1])]
    assert worker.state() == {1: (_sampled(first, 0), [0, 4], 7, 0), 2: (_sampled(second, 1), [0, 1], 7, 1)}


def test_a_sequence_swapped_out_and_back_in_gets_its_table_rewritten_from_zero(worker: WorkerUnderTest) -> None:
    worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1)),)))
    worker.execute(StepPlan(1, scheduled_sequences=(ScheduledSequence(1, 1),)))
    tokens = _sampled(_sampled(list(PROMPT)))
    assert worker.execute(StepPlan(2, swap_out=((0, 2), (1, 3)))) == []
    assert worker.state() == {1: (tokens, [0, 1], 7, 0)}
    # Another sequence overwrites the device blocks sequence 1 left while it is out.
    worker.execute(StepPlan(3, new_sequences=(NewSequence(9, (50, 51, 52, 53, 54), (), GREEDY, (1, 0), 0, 5),)))
    resume = ScheduledSequence(1, 1, (BlockTableUpdate(0, (5, 6)),))
    outputs = worker.execute(StepPlan(4, dropped_seq_ids=(9,), swap_in=((2, 5), (3, 6)), scheduled_sequences=(resume,)))
    assert outputs == [(1, _sampled(tokens)[-1])]
    assert worker.state() == {1: (_sampled(tokens), [5, 6], 8, 0)}


def test_a_dropped_sequence_is_gone_and_scheduling_it_later_is_rejected(worker: WorkerUnderTest) -> None:
    worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1)), _new(3, (2, 3)))))
    outputs = worker.execute(StepPlan(1, dropped_seq_ids=(1,), scheduled_sequences=(ScheduledSequence(3, 1),)))
    assert outputs == [(3, _sampled(_sampled(list(PROMPT)))[-1])]
    after_drop = {3: (_sampled(_sampled(list(PROMPT))), [2, 3], 7, 0)}
    assert worker.state() == after_drop
    with pytest.raises(Rejected, match="scheduled sequence 1"):
        worker.execute(StepPlan(2, scheduled_sequences=(ScheduledSequence(1, 1),)))
    assert worker.state() == after_drop


@pytest.mark.parametrize(
    "plan",
    [
        # A valid drop and a valid admission, then a sequence that is not held: nothing of the plan happens.
        StepPlan(1, dropped_seq_ids=(3,), new_sequences=(_new(5, (4, 5)),), scheduled_sequences=(
            ScheduledSequence(7, 1),)),
        StepPlan(1, dropped_seq_ids=(7,)),
        StepPlan(1, new_sequences=(_new(3, (4, 5)),)),
        StepPlan(1, new_sequences=(_new(5, (4, 5), fork_seq_ids=(1,)),)),
        StepPlan(1, scheduled_sequences=(ScheduledSequence(1, 1), ScheduledSequence(1, 1))),
        StepPlan(1, new_sequences=(_new(5, (4, 5)),), scheduled_sequences=(ScheduledSequence(5, 1),)),
    ],
    ids=["schedules-unknown", "drops-unknown", "admits-held", "forks-onto-held", "schedules-twice",
         "schedules-a-new-one-again"],
)  # fmt: skip
def test_a_plan_naming_sequences_wrongly_is_rejected_whole(worker: WorkerUnderTest, plan: StepPlan) -> None:
    worker.execute(StepPlan(0, new_sequences=(_new(1, (0, 1)), _new(3, (2, 3)))))
    before = worker.state()
    with pytest.raises(Rejected):
        worker.execute(plan)
    assert worker.state() == before
    assert set(before) == {1, 3}
