"""The plan a StepBuilder becomes: plain decodes (one token, no table update) after the other scheduled sequences,
whatever order they were decided in, so that the step's wire form packs them."""

from __future__ import annotations

from pagedserve.contract import codec
from pagedserve.contract.step import BlockTableUpdate, ScheduledSequence
from pagedserve.control_plane.scheduling.step_builder import StepBuilder


def test_plain_decodes_are_planned_after_the_other_scheduled_sequences_and_travel_packed() -> None:
    step = StepBuilder(budget=64, num_seqs=4)
    step.add_scheduled(1, 1, None)
    step.add_scheduled(2, 1, BlockTableUpdate(3, (17,)))
    step.add_scheduled(3, 1, None)
    step.add_scheduled(4, 8, None)

    plan = step.build(step_id=5, dropped_seq_ids=[])

    assert plan.scheduled_sequences == (
        ScheduledSequence(2, 1, (BlockTableUpdate(3, (17,)),)), ScheduledSequence(4, 8),
        ScheduledSequence(1, 1), ScheduledSequence(3, 1),
    )
    wire = codec.step_plan_to_proto(plan)
    assert ([s.seq_id for s in wire.scheduled_sequences], list(wire.decode_seq_ids)) == ([2, 4], [1, 3])
