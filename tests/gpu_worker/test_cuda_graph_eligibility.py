"""Which steps the decode graphs take: one token for each sequence, within the captured sizes and table width.
The check reads only the step's shape, so it runs on the CPU without capturing anything."""

from __future__ import annotations

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.cuda_graph import CudaGraphRunner
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceState
from pagedserve.kernels.reference import TorchReferenceOps

BLOCK_SIZE = 4


def _runner(max_batch_size: int = 8, max_blocks: int = 2) -> CudaGraphRunner:
    model = torch.nn.Module()  # never called: nothing is captured or replayed
    return CudaGraphRunner(model, torch.zeros(1), BLOCK_SIZE, max_batch_size, max_blocks,  # type: ignore[arg-type]
                           TorchReferenceOps())


def _work(tables: BlockTableArray, *scheduled: tuple[int, int]) -> list[ScheduledWork]:
    """One sequence of `length` known tokens per (length, tokens this step)."""
    work = []
    for seq_id, (length, num_tokens) in enumerate(scheduled):
        blocks = list(range(seq_id * 3, seq_id * 3 + -(-length // BLOCK_SIZE)))
        state = SequenceState(seq_id, list(range(1, length + 1)), [], SamplingParams(), (), tables.add(blocks),
                              length - num_tokens)
        work.append(ScheduledWork.of(state, num_tokens))
    return work


def test_a_step_of_one_token_per_sequence_runs_the_graph() -> None:
    assert _runner().can_run(_work(BlockTableArray(4, 3), (5, 1), (3, 1)))


def test_a_sequence_without_tokens_beside_a_two_token_one_is_no_decode_step() -> None:
    # As many tokens as sequences, yet one sequence has two rows: the graph's one-row-per-sequence layout would
    # misplace them.
    assert not _runner().can_run(_work(BlockTableArray(4, 3), (5, 0), (3, 2)))


def test_a_prefill_chunk_does_not_run_the_graph() -> None:
    assert not _runner().can_run(_work(BlockTableArray(4, 3), (6, 3)))


def test_more_sequences_or_wider_tables_than_captured_do_not_run_the_graph() -> None:
    assert not _runner(max_batch_size=1).can_run(_work(BlockTableArray(4, 3), (5, 1), (3, 1)))
    assert not _runner(max_blocks=1).can_run(_work(BlockTableArray(4, 3), (5, 1)))


def test_a_sequence_as_long_as_the_captured_tables_hold_runs_the_graph_and_one_token_more_does_not() -> None:
    runner = _runner(max_blocks=2)  # tables of 2 blocks of BLOCK_SIZE tokens
    assert runner.can_run(_work(BlockTableArray(4, 3), (2 * BLOCK_SIZE, 1)))
    assert not runner.can_run(_work(BlockTableArray(4, 3), (2 * BLOCK_SIZE + 1, 1)))
