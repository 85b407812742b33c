"""The decode graphs' static inputs, staged on the CPU: the same rows build_batch makes for the step, then padding
that writes no K/V and attends to nothing, whichever host buffer of the rotation a step is written from; the block
tables once a graph's first launch has spread them."""

from __future__ import annotations

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.decode_inputs import HOST_SLOTS, DecodeInputs
from pagedserve.gpu_worker.model_runner import build_batch
from pagedserve.gpu_worker.sequence_state import PENDING_TOKEN, ScheduledWork, SequenceState
from pagedserve.kernels.reference import TorchReferenceOps

BLOCK_SIZE = 4
LAST_TOKENS = torch.tensor([90, 91, 92, 93, 94, 95, 96, 97])


def _inputs(size: int, max_blocks: int) -> DecodeInputs:
    return DecodeInputs(size, max_blocks, BLOCK_SIZE, torch.device("cpu"), TorchReferenceOps())


def _decode_work(tables: BlockTableArray, lengths: list[int], pending: set[int]) -> list[ScheduledWork]:
    """Per length, a sequence of that many tokens decoding its last one: still on the device if its index is in
    pending, else known."""
    work = []
    for seq_id, length in enumerate(lengths):
        outputs = [50 + seq_id, PENDING_TOKEN if seq_id in pending else 60 + seq_id]
        blocks = [10 * seq_id + block for block in range(-(-length // BLOCK_SIZE))]
        state = SequenceState(seq_id, list(range(1, length - 1)), outputs, SamplingParams(), (), tables.add(blocks),
                              length - 1)
        work.append(ScheduledWork.of(state, 1))
    return work


def _staged(inputs: DecodeInputs, padded: int) -> dict[str, list[int] | list[list[int]]]:
    return {
        "input_ids": inputs.input_ids[:padded].tolist(),
        "positions": inputs.positions[:padded].tolist(),
        "slot_mapping": inputs.slot_mapping[:padded].tolist(),
        "seq_lens": inputs.seq_lens[:padded].tolist(),
        "query_start_loc": inputs.query_start_loc[: padded + 1].tolist(),
    }


def test_staged_rows_are_build_batchs_and_the_padding_writes_and_attends_to_nothing() -> None:
    tables = BlockTableArray(num_rows=8, num_columns=2)
    work = _decode_work(tables, [6, 9, 3], pending={0, 2})
    inputs = _inputs(size=8, max_blocks=4)

    inputs.stage(work, tables, padded=4, last_tokens=LAST_TOKENS)
    inputs.spread_tables(padded=4)  # a graph's first launch

    batch = build_batch(work, tables, BLOCK_SIZE, torch.device("cpu"), LAST_TOKENS)
    table_rows = [item.state.table_row for item in work]
    assert _staged(inputs, padded=4) == {
        "input_ids": batch.input_ids.tolist() + [0],
        "positions": batch.positions.tolist() + [0],
        "slot_mapping": batch.meta.slot_mapping.tolist() + [-1],
        "seq_lens": batch.meta.seq_lens.tolist() + [0],
        "query_start_loc": batch.meta.query_start_loc.tolist() + [3],
    }
    assert batch.input_ids.tolist() == [LAST_TOKENS[table_rows[0]], 61, LAST_TOKENS[table_rows[2]]]
    assert inputs.block_tables[:3, :3].tolist() == [[0, 1, 0], [10, 11, 12], [20, 0, 0]]
    assert inputs.table_rows[:3].tolist() == table_rows


def test_a_known_token_is_staged_without_reading_last_tokens_at_its_row() -> None:
    # The runner's last tokens reach only the rows that ever sampled on the device; a sequence whose token is known
    # (a one-token prompt, a prompt the prefix cache held whole) may sit on a table row past them.
    tables = BlockTableArray(num_rows=2, num_columns=2)
    pending, known = _decode_work(tables, [5, 6, 7], pending={1})[1:]
    last_tokens = LAST_TOKENS[:2]
    assert (pending.state.table_row, known.state.table_row) == (1, 2)
    inputs = _inputs(size=4, max_blocks=4)

    inputs.stage([pending, known], tables, padded=2, last_tokens=last_tokens)

    assert inputs.input_ids[:2].tolist() == [int(last_tokens[1]), 62]


def test_a_smaller_step_after_a_larger_one_pads_every_row_its_graph_reads() -> None:
    tables = BlockTableArray(num_rows=8, num_columns=2)
    inputs = _inputs(size=8, max_blocks=4)
    large = _decode_work(tables, [5, 6, 7, 8, 9, 10], pending=set())
    for _ in range(HOST_SLOTS):  # every host buffer holds the large step, the small one reuses one of them
        inputs.stage(large, tables, padded=8, last_tokens=LAST_TOKENS)
    small = _decode_work(tables, [4], pending={0})

    inputs.stage(small, tables, padded=2, last_tokens=LAST_TOKENS)

    row = small[0].state.table_row
    assert _staged(inputs, padded=2) == {
        "input_ids": [int(LAST_TOKENS[row]), 0],
        "positions": [3, 0],
        "slot_mapping": [3, -1],
        "seq_lens": [4, 0],
        "query_start_loc": [0, 1, 1],
    }


def test_every_host_buffer_of_the_rotation_stages_its_own_step() -> None:
    tables = BlockTableArray(num_rows=8, num_columns=2)
    inputs = _inputs(size=4, max_blocks=8)
    for step in range(2 * HOST_SLOTS + 1):
        lengths = [3 + step, 4 + step][: 1 + step % 2]  # tables widen as the steps go on
        work = _decode_work(tables, lengths, pending=set())
        inputs.stage(work, tables, padded=2, last_tokens=LAST_TOKENS)
        inputs.spread_tables(padded=2)
        batch = build_batch(work, tables, BLOCK_SIZE, torch.device("cpu"))
        width = batch.meta.block_tables.shape[1]
        assert inputs.slot_mapping[: len(work)].tolist() == batch.meta.slot_mapping.tolist()
        assert inputs.block_tables[: len(work), :width].tolist() == batch.meta.block_tables.tolist()
        for item in work:
            tables.free(item.state.table_row)
