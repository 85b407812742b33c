"""The sizes graphs are captured for, and steps that are not pure decodes run as captured pieces between eager
attentions, with the eager forward's output."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch

from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.cuda_graph import capture_sizes
from pagedserve.gpu_worker.model_runner import FlatBatch, build_batch
from pagedserve.gpu_worker.models.decoder import run_pieces
from pagedserve.gpu_worker.models.layers import AttentionBuffers
from pagedserve.gpu_worker.piecewise_graph import piece_sizes
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceState
from pagedserve.gpu_worker.worker import Worker
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, load_worker

BLOCK_SIZE = 4


def test_piece_sizes_are_small_powers_of_two_then_multiples_of_128_up_to_the_limit() -> None:
    assert piece_sizes(300) == (16, 32, 64, 128, 256, 300)
    assert piece_sizes(2048) == (16, 32, 64, *range(128, 2049, 128))
    assert piece_sizes(10) == (10,)


def test_decode_sizes_are_1_2_4_then_multiples_of_8_to_256_then_of_32_up_to_the_limit() -> None:
    assert capture_sizes(1024) == (1, 2, 4, *range(8, 257, 8), *range(288, 1025, 32))
    assert capture_sizes(300) == (1, 2, 4, *range(8, 257, 8), 288, 300)
    assert capture_sizes(3) == (1, 2, 3)


def _filled_worker(device: DeviceKind) -> Worker:
    """A stories260K worker whose pool holds random K/V, so attention reads earlier context."""
    worker = load_worker(STORIES_DIR, BLOCK_SIZE, num_blocks=40, device=device)
    generator = torch.Generator(device=worker.pool.gpu_cache.device).manual_seed(0)
    worker.pool.gpu_cache.normal_(generator=generator)
    return worker


# (known tokens, computed tokens) per sequence: a prompt chunk after cached tokens, a whole prompt, two decodes.
MIXED_16 = [(13, 4), (5, 0), (20, 19), (7, 6)]
MIXED_21 = [(13, 4), (10, 0), (20, 19), (7, 6)]


def _mixed_batch(worker: Worker, rng: np.random.Generator, shapes: list[tuple[int, int]] = MIXED_16) -> FlatBatch:
    tables = BlockTableArray()
    work = []
    for seq_id, (num_tokens, num_computed) in enumerate(shapes):
        num_blocks = -(-num_tokens // BLOCK_SIZE)
        row = tables.add(tuple(range(seq_id * 8, seq_id * 8 + num_blocks)))
        state = SequenceState(seq_id, rng.integers(3, 500, num_tokens).tolist(), [], SamplingParams(), (), row,
                              num_computed)
        work.append(ScheduledWork.of(state, num_tokens - num_computed))
    return build_batch(work, tables, BLOCK_SIZE, worker.device)


def _eager(worker: Worker, batch: FlatBatch, buffers: AttentionBuffers | None = None) -> torch.Tensor:
    model, kv_cache, meta = worker.loaded.model, worker.pool.gpu_cache, batch.meta
    pieces = model.pieces(batch.input_ids, batch.positions, meta.slot_mapping, kv_cache, buffers)
    return run_pieces(pieces, lambda call: model.attend(call, meta, kv_cache)).clone()


@pytest.mark.parametrize("device", [DeviceKind.CPU, pytest.param(DeviceKind.CUDA, marks=NEEDS_GPU)])
def test_pieces_writing_attention_rows_into_shared_buffers_give_the_forward_pass_output(device: DeviceKind) -> None:
    worker = _filled_worker(device)
    batch = _mixed_batch(worker, np.random.default_rng(0))
    config = worker.loaded.config
    shape = (batch.num_tokens + 3, config.num_heads, config.head_dim)  # longer than the batch, as in the runner
    query, out = (torch.full(shape, float("nan"), dtype=worker.loaded.dtype, device=worker.device) for _ in "qo")

    eager = _eager(worker, batch)
    in_buffers = _eager(worker, batch, AttentionBuffers(query[: batch.num_tokens], out[: batch.num_tokens]))

    torch.testing.assert_close(in_buffers, eager, rtol=0, atol=0)


@pytest.mark.parametrize(("shapes", "size"), [
    pytest.param(MIXED_16, 16, id="exact-size", marks=NEEDS_GPU),
    pytest.param(MIXED_21, 32, id="padded", marks=NEEDS_GPU),
])
def test_replayed_pieces_match_the_eager_forward_pass_and_write_the_same_kv(
    shapes: list[tuple[int, int]], size: int
) -> None:
    worker = _filled_worker(DeviceKind.CUDA)
    runner = worker.runner.piece_runner
    assert runner is not None
    batch = _mixed_batch(worker, np.random.default_rng(1), shapes)
    runner.buffers.query.fill_(float("nan"))  # rows the replay must overwrite
    runner.buffers.out.fill_(float("nan"))
    cache_before = worker.pool.gpu_cache.clone()
    eager = _eager(worker, batch)
    cache_after_eager = worker.pool.gpu_cache.clone()
    worker.pool.gpu_cache.copy_(cache_before)

    replayed = runner.run(batch).clone()

    assert runner.sizes[bisect.bisect_left(runner.sizes, batch.num_tokens)] == size  # the size replayed
    assert runner.num_replays == 1
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(worker.pool.gpu_cache, cache_after_eager, rtol=0, atol=0)  # padding wrote nothing
