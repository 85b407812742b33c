"""The control-plane step-cost benchmark: its instant worker keeps the step contract, its medians take only the
decode steps that ran every sequence, and its output digest does not depend on how the outputs were streamed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.engine_step_cost import InstantWorker, decode_medians, run_once, token_for
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.engine.status import StepRecord
from pagedserve.control_plane.scheduling.request import Request
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.factories import make_scheduler


def test_instant_worker_samples_only_at_the_end_of_the_known_tokens() -> None:
    scheduler = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=4)
    request = Request("r", (1, 2, 3, 4, 5, 6), SamplingParams(max_tokens=3), (2,), 0.0)
    scheduler.add_request(request)
    worker = InstantWorker()

    async def three_steps() -> list[list[int | None]]:
        tokens = []
        for _ in range(3):
            plan = scheduler.schedule()
            await worker.send(plan)
            result = await worker.receive()
            scheduler.update_from_output(plan, result)
            tokens.append([o.token_id for o in result.outputs])
        return tokens

    seq_id = request.sequences[0].seq_id
    assert asyncio.run(three_steps()) == [[None], [token_for(seq_id, 0)], [token_for(seq_id, 1)]]
    assert request.sequences[0].output_token_ids == [token_for(seq_id, 0), token_for(seq_id, 1)]


def _record(step_id: int, num_seqs: int, num_tokens: int, plan_ms: float, apply_ms: float) -> StepRecord:
    return StepRecord(step_id, num_seqs, num_tokens, plan_ms, apply_ms, received_s=0.0, worker_host_ms=0.0,
                      device_ms=0.0, idle_ms=0.0)


def test_medians_take_only_decode_steps_of_every_sequence() -> None:
    records = [_record(0, 4, 40, 9.0, 9.0), _record(1, 4, 4, 1.0, 2.0), _record(2, 4, 4, 3.0, 6.0),
               _record(3, 4, 4, 2.0, 4.0), _record(4, 3, 3, 0.1, 0.1)]
    assert decode_medians(records, 4) == {"decode_steps": 3, "plan_ms": 2.0, "apply_ms": 4.0, "sum_ms": 6.0}
    with pytest.raises(ValueError, match="no decode step ran all 5"):
        decode_medians(records, 5)


def test_outputs_are_the_same_whether_streamed_or_final_only(llama2_tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer(llama2_tokenizer_dir)
    offline = asyncio.run(run_once(tokenizer, 8, 20, 12, final_only=True, stop=()))
    streamed = asyncio.run(run_once(tokenizer, 8, 20, 12, final_only=False, stop=()))
    assert offline[1] == streamed[1]
    assert decode_medians(offline[0], 8)["decode_steps"] >= 8
