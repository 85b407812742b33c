"""The worker step-cost benchmark: its planner sends decode steps as the scheduler does (a block appended only when a
token starts one), its clock takes the forward pass out of the host time, and overlapping launches changes no token."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from benchmarks.worker_step_cost import (
    MODES,
    DecodePlanner,
    ForwardClock,
    StepTimes,
    medians,
    run_once,
    write_one_layer_model,
)
from pagedserve.contract.step import BlockTableUpdate, ScheduledSequence


def test_planner_appends_a_block_only_when_a_decode_token_starts_one() -> None:
    planner = DecodePlanner(2, prompt_len=6, block_size=4, params=MODES["greedy"], vocab_size=512)
    prefill = planner.prefill()
    assert [(s.seq_id, s.block_ids, s.num_computed_tokens, s.num_scheduled_tokens) for s in prefill.new_sequences] \
        == [(0, (0, 1), 0, 6), (1, (2, 3), 0, 6)]
    decodes = [planner.decode() for _ in range(3)]  # the tokens at positions 6, 7, then 8 (a new block)
    assert [plan.step_id for plan in decodes] == [1, 2, 3]
    assert decodes[0].scheduled_sequences == decodes[1].scheduled_sequences == (
        ScheduledSequence(0, 1), ScheduledSequence(1, 1))
    assert decodes[2].scheduled_sequences == (ScheduledSequence(0, 1, (BlockTableUpdate(2, (4,)),)),
                                              ScheduledSequence(1, 1, (BlockTableUpdate(2, (5,)),)))
    assert planner.drop_all().dropped_seq_ids == (0, 1)


class _SlowModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x + 1

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return hidden * 2


def test_forward_clock_counts_the_forward_pass_and_the_logits_once() -> None:
    model = _SlowModel()
    clock = ForwardClock(model)
    started = time.perf_counter()
    logits = model.compute_logits(model(torch.ones(2)))
    elapsed = time.perf_counter() - started
    assert logits.tolist() == [4.0, 4.0]
    forward_s = clock.take_s()
    assert 0.03 <= forward_s <= elapsed
    assert clock.take_s() == 0.0


def test_medians_are_per_stage_and_the_host_sum_leaves_the_forward_pass_out() -> None:
    times = [StepTimes(1.0, 2.0, 50.0, 0.5, 0.25), StepTimes(3.0, 4.0, 70.0, 1.5, 0.75),
             StepTimes(2.0, 3.0, 60.0, 1.0, 0.5)]
    row = medians(times)
    assert (row["decode_ms"], row["launch_ms"], row["finish_ms"], row["encode_ms"]) == (2.0, 3.0, 1.0, 0.5)
    assert (row["host_ms"], row["forward_ms"]) == (6.5, 60.0)
    with pytest.raises(ValueError, match="no decode step"):
        medians([])


@pytest.mark.parametrize("mode", ["greedy", "schema"])
def test_overlapped_launches_sample_the_same_tokens_as_one_step_at_a_time(tmp_path: Path, stories260k_dir: Path,
                                                                          mode: str) -> None:
    model_dir = write_one_layer_model(stories260k_dir, tmp_path)
    one_at_a_time, tokens = run_once(model_dir, 3, 9, 6, MODES[mode], depth=1, block_size=4)
    overlapped, overlapped_tokens = run_once(model_dir, 3, 9, 6, MODES[mode], depth=3, block_size=4)
    assert sorted(tokens) == [0, 1, 2]
    assert all(len(t) == 7 for t in tokens.values())  # the prefill's token, then one per decode step
    assert overlapped_tokens == tokens
    assert len(one_at_a_time) == len(overlapped) == 6
    assert all(t.forward_ms > 0 and t.launch_ms > 0 and t.finish_ms > 0 for t in overlapped)
