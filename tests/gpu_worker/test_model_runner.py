"""Batch building and what the runner returns besides tokens: logprobs of sampled and prompt tokens."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from pagedserve.contract.codec import token_ids_to_bytes
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.model_runner import LaunchedRun, build_batch
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceState
from pagedserve.v1 import common_pb2
from pagedserve.v1 import worker_service_pb2 as pb
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, load_worker

GOLDEN = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
PROMPT = GOLDEN["prompt_ids"]


def test_flat_batch_places_each_token_at_its_position_and_slot() -> None:
    tables = BlockTableArray(num_rows=1, num_columns=1)  # grows to fit both tables
    # Sequence 0: prefill chunk of positions 2..4; sequence 1: decode at position 5 (its first output).
    params = SamplingParams()
    work = [
        ScheduledWork.of(SequenceState(0, [10, 11, 12, 13, 14, 15], [], params, (), tables.add([7, 3]), 2), 3),
        ScheduledWork.of(SequenceState(1, [20, 21, 22, 23, 24], [25], params, (), tables.add([1, 6, 9]), 5), 1),
    ]

    batch = build_batch(work, tables, block_size=4, device=torch.device("cpu"))

    assert batch.input_ids.tolist() == [12, 13, 14, 25]
    assert batch.positions.tolist() == [2, 3, 4, 5]
    assert batch.meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 3 * 4 + 0, 6 * 4 + 1]
    assert batch.meta.block_tables.tolist() == [[7, 3], [1, 6]]
    assert batch.meta.seq_lens.tolist() == [5, 6]
    assert batch.meta.query_start_loc.tolist() == [0, 3, 4]
    assert (batch.meta.max_query_len, batch.meta.max_seq_len) == (3, 6)
    assert batch.query_start_loc.tolist() == [0, 3, 4] and batch.query_start_loc.dtype == np.int64


def test_decode_batch_of_pending_tokens_reads_them_from_the_last_token_buffer() -> None:
    tables = BlockTableArray(num_rows=4, num_columns=2)
    params = SamplingParams()
    # Two decode sequences: one whose last token is still on the device, one whose token is known.
    pending = SequenceState(0, [10, 11, 12], [13, -1], params, (), tables.add([5, 2]), 4)
    known = SequenceState(1, [20, 21, 22, 23], [24], params, (), tables.add([8, 1]), 4)
    last_tokens = torch.tensor([99, 77, 0, 0])

    batch = build_batch([ScheduledWork.of(pending, 1), ScheduledWork.of(known, 1)], tables, block_size=4,
                        device=torch.device("cpu"), last_tokens=last_tokens)

    assert batch.input_ids.tolist() == [99, 24]
    assert batch.positions.tolist() == [4, 4]
    assert batch.meta.slot_mapping.tolist() == [2 * 4 + 0, 1 * 4 + 0]
    assert batch.meta.query_start_loc.tolist() == [0, 1, 2]
    assert (batch.meta.max_query_len, batch.meta.max_seq_len) == (1, 5)


def test_a_sequence_with_no_token_this_step_beside_a_two_token_one_is_no_decode_batch() -> None:
    tables = BlockTableArray(num_rows=2, num_columns=2)
    params = SamplingParams()
    idle = SequenceState(0, [10, 11, 12], [], params, (), tables.add([4]), 1)
    chunk = SequenceState(1, [20, 21, 22, 23], [], params, (), tables.add([6]), 1)

    batch = build_batch([ScheduledWork.of(idle, 0), ScheduledWork.of(chunk, 2)], tables, block_size=4,
                        device=torch.device("cpu"))

    assert not batch.is_decode
    assert batch.input_ids.tolist() == [21, 22]
    assert batch.positions.tolist() == [1, 2]
    assert batch.meta.slot_mapping.tolist() == [6 * 4 + 1, 6 * 4 + 2]
    assert batch.meta.query_start_loc.tolist() == [0, 0, 2]


def test_logprobs_and_chunked_prompt_logprobs_match_the_reference_model() -> None:
    # transformers leaves PreTrainedModel.eval unannotated.
    reference = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        log_probs = reference(torch.tensor([PROMPT])).logits[0].log_softmax(dim=-1)
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=4), 4, num_blocks=8)
    sampling = common_pb2.SamplingParams(temperature=0.0, logprobs=2, prompt_logprobs=1)
    new = pb.NewSequence(seq_id=3, prompt_token_ids=token_ids_to_bytes(PROMPT), sampling_params=sampling,
                         block_ids=[0, 1], num_computed_tokens=0, num_scheduled_tokens=3)
    first = driver.execute(pb.ExecuteRequest(new_sequences=[new]))
    second = driver.execute(
        pb.ExecuteRequest(scheduled_sequences=[pb.ScheduledSequence(seq_id=3, num_scheduled_tokens=2)]))

    prompt_logprobs = [*first.outputs[0].prompt_logprobs, *second.outputs[0].prompt_logprobs]
    sampled = second.outputs[0]
    assert sampled.logprobs is not None
    expected_prompt = [log_probs[i, PROMPT[i + 1]].item() for i in range(len(PROMPT) - 1)]
    top2 = log_probs[-1].topk(2)
    assert (len(first.outputs[0].prompt_logprobs), len(second.outputs[0].prompt_logprobs)) == (3, 1)
    assert [p.token_id for p in prompt_logprobs] == PROMPT[1:]
    assert np.allclose([p.logprob for p in prompt_logprobs], expected_prompt, atol=1e-4)
    assert (sampled.token_id, sampled.logprobs.token_id, sampled.logprobs.rank) == (
        (GOLDEN["greedy_new_ids"][0],) * 2 + (1,))
    assert list(sampled.logprobs.top_token_ids) == top2.indices.tolist()
    assert np.allclose(sampled.logprobs.top_logprobs, top2.values.tolist(), atol=1e-4)


def test_a_graph_runs_staged_table_rows_index_its_tokens_only_when_every_item_samples_once() -> None:
    runner = load_worker(STORIES_DIR).runner
    tables = BlockTableArray(num_rows=4, num_columns=1)
    work = [ScheduledWork.of(SequenceState(seq_id, [1, 2, 3], [], SamplingParams(), (), tables.add([seq_id]), 2), 1)
            for seq_id in range(3)]
    rows = [item.state.table_row for item in work]
    staged = torch.tensor(rows)
    run = LaunchedRun(work, [(item.state.seq_id,) for item in work], [() for _ in work], None, table_rows=staged)

    assert runner.last_token_index(run, rows) is staged
    reordered = runner.last_token_index(run, rows[::-1])  # as many rows, in another order
    assert reordered is not staged and reordered is not None and reordered.tolist() == rows[::-1]
    with_fork = runner.last_token_index(run, [*rows, 3])  # a sibling forked this step, on a row of its own
    without_first = runner.last_token_index(run, rows[1:])  # the first item does not sample
    assert with_fork is not None and with_fork.tolist() == [*rows, 3]
    assert without_first is not None and without_first.tolist() == rows[1:]
    assert runner.last_token_index(run, []) is None
