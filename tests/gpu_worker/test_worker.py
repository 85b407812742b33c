"""Worker step semantics: copy-on-write, swap round trips, forks, drops and validation before mutation."""

from __future__ import annotations

import json

import pytest

from pagedserve.contract.codec import token_ids_to_bytes
from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.step import StepResult
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.errors import CacheNotInitializedError, InvalidStepError
from pagedserve.gpu_worker.worker import Worker
from pagedserve.v1 import worker_service_pb2 as pb
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, greedy, load_worker

BLOCK_SIZE = 4
GOLDEN = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
PROMPT = GOLDEN["prompt_ids"]  # 5 tokens: blocks 0 and 1, block 1 partly filled
EXPECTED = GOLDEN["greedy_new_ids"]


def _new(seq_id: int, block_ids: list[int], fork_seq_ids: tuple[int, ...] = ()) -> pb.NewSequence:
    return pb.NewSequence(seq_id=seq_id, prompt_token_ids=token_ids_to_bytes(PROMPT), sampling_params=greedy(),
                          block_ids=block_ids,
                          num_computed_tokens=0, num_scheduled_tokens=len(PROMPT), fork_seq_ids=fork_seq_ids)


def _decode(seq_id: int, start_index: int = 0, block_ids: tuple[int, ...] = ()) -> pb.ScheduledSequence:
    updates = [pb.BlockTableUpdate(start_index=start_index, block_ids=block_ids)] if block_ids else []
    return pb.ScheduledSequence(seq_id=seq_id, num_scheduled_tokens=1, block_table_updates=updates)


def _tokens(result: StepResult) -> dict[int, int | None]:
    return {o.seq_id: o.token_id for o in result.outputs}


def test_forked_sibling_with_copied_last_block_generates_the_same_tokens() -> None:
    block_size = 8  # the 5-token prompt sits in one partly filled block, shared after the fork
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=block_size), block_size, num_blocks=8)
    # A finished sequence leaves other tokens' K/V in block 5.
    other = pb.NewSequence(seq_id=9, prompt_token_ids=token_ids_to_bytes(EXPECTED[10:18]), sampling_params=greedy(),
                           block_ids=[5], num_computed_tokens=0, num_scheduled_tokens=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[other]))
    first = driver.execute(pb.ExecuteRequest(dropped_seq_ids=[9], new_sequences=[_new(1, [0], fork_seq_ids=(2,))]))
    # The sibling's table becomes [5, 6]: its tokens can only match if block 0 was copied onto block 5.
    copy_step = pb.ExecuteRequest(block_copies=[pb.BlockMapping(src_block_id=0, dst_block_id=5)],
                                  scheduled_sequences=[_decode(1, 1, (1,)), _decode(2, 0, (5, 6))])
    responses = [driver.execute(copy_step)]
    responses += [driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1), _decode(2)])) for _ in range(5)]

    assert [o.seq_id for o in first.outputs] == [1, 2]
    assert [_tokens(r)[1] for r in [first, *responses]] == EXPECTED[:7]
    assert [_tokens(r)[2] for r in [first, *responses]] == EXPECTED[:7]


def test_swap_out_and_back_into_other_blocks_keeps_the_tokens() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8, num_cpu_blocks=4)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=8)
    tokens = [_tokens(driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1])])))[1]]
    tokens += [_tokens(driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1)])))[1] for _ in range(2)]
    driver.execute(pb.ExecuteRequest(swap_out=[pb.BlockMapping(src_block_id=0, dst_block_id=3),
                                               pb.BlockMapping(src_block_id=1, dst_block_id=0)]))
    # Another sequence overwrites the freed device blocks while sequence 1 is swapped out.
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(9, [1, 0])]))
    swap_in = [pb.BlockMapping(src_block_id=3, dst_block_id=6), pb.BlockMapping(src_block_id=0, dst_block_id=7)]
    resumed = driver.execute(pb.ExecuteRequest(dropped_seq_ids=[9], swap_in=swap_in,
                                               scheduled_sequences=[_decode(1, 0, (6, 7))]))
    tokens.append(_tokens(resumed)[1])
    tokens += [_tokens(driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1, 2, (2,))])))[1]]

    assert tokens == EXPECTED[:5]


def test_prefill_chunk_short_of_the_last_token_returns_no_token() -> None:
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=BLOCK_SIZE), BLOCK_SIZE, num_blocks=8)
    chunk = pb.NewSequence(seq_id=1, prompt_token_ids=token_ids_to_bytes(PROMPT), sampling_params=greedy(),
                           block_ids=[0], num_computed_tokens=0, num_scheduled_tokens=3)
    first = driver.execute(pb.ExecuteRequest(new_sequences=[chunk]))
    rest = pb.ScheduledSequence(seq_id=1, num_scheduled_tokens=2,
                                block_table_updates=[pb.BlockTableUpdate(start_index=1, block_ids=[1])])
    second = driver.execute(pb.ExecuteRequest(scheduled_sequences=[rest]))

    assert (_tokens(first), _tokens(second)) == ({1: None}, {1: EXPECTED[0]})


def test_resumed_sequence_with_outputs_continues_where_it_stopped() -> None:
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=BLOCK_SIZE), BLOCK_SIZE, num_blocks=8)
    resumed = pb.NewSequence(seq_id=4, prompt_token_ids=token_ids_to_bytes(PROMPT),
                             output_token_ids=token_ids_to_bytes(EXPECTED[:3]), sampling_params=greedy(),
                             block_ids=[3, 2], num_computed_tokens=0, num_scheduled_tokens=len(PROMPT) + 3)

    response = driver.execute(pb.ExecuteRequest(new_sequences=[resumed]))

    assert _tokens(response) == {4: EXPECTED[3]}


def test_dropped_sequence_is_forgotten() -> None:
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=BLOCK_SIZE), BLOCK_SIZE, num_blocks=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1])]))
    driver.execute(pb.ExecuteRequest(dropped_seq_ids=[1]))

    with pytest.raises(InvalidStepError, match="scheduled sequence 1"):
        driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1)]))


def test_invalid_step_changes_no_sequence() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1]), _new(3, [2, 3])]))
    before = {i: (list(s.output_token_ids), worker.registry.block_table(i), s.num_computed_tokens)
              for i, s in worker.registry.states.items()}

    # A valid drop and a valid new sequence, then a table update leaving a gap: the whole step is refused.
    with pytest.raises(InvalidStepError, match="gap"):
        driver.execute(pb.ExecuteRequest(dropped_seq_ids=[1], new_sequences=[_new(2, [4, 5])],
                                         scheduled_sequences=[_decode(3, 3, (6,))]))
    after = {i: (list(s.output_token_ids), worker.registry.block_table(i), s.num_computed_tokens)
             for i, s in worker.registry.states.items()}

    assert after == before == {1: ([EXPECTED[0]], [0, 1], 5), 3: ([EXPECTED[0]], [2, 3], 5)}


def test_execute_before_init_cache_raises_cache_not_initialized() -> None:
    worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU))

    with pytest.raises(CacheNotInitializedError):
        WorkerDriver(worker, BLOCK_SIZE, num_blocks=8).execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1])]))


def test_init_cache_again_drops_every_sequence() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8)
    WorkerDriver(worker, BLOCK_SIZE, num_blocks=8).execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1])]))
    worker.init_cache(CacheRequest(block_size=BLOCK_SIZE, num_gpu_blocks_override=4))

    assert (worker.registry.states, worker.registry.num_gpu_blocks) == ({}, 4)


def _held(worker: Worker) -> dict[int, tuple[list[int], list[int], int]]:
    return {i: (list(s.output_token_ids), worker.registry.block_table(i), s.num_computed_tokens)
            for i, s in worker.registry.states.items()}


def test_decode_past_the_known_tokens_or_the_table_is_refused_and_changes_nothing() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1])]))
    for _ in range(3):  # positions 5, 6, 7: the table's two blocks are full
        driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1)]))
    before = _held(worker)
    two_tokens = pb.ScheduledSequence(seq_id=1, num_scheduled_tokens=2)

    with pytest.raises(InvalidStepError, match="^sequence 1: 8 computed \\+ 2 scheduled tokens exceed its 9 known"):
        driver.execute(pb.ExecuteRequest(scheduled_sequences=[two_tokens]))
    with pytest.raises(InvalidStepError, match="^sequence 1 has 2 blocks, needs 3$"):
        driver.execute(pb.ExecuteRequest(scheduled_sequences=[_decode(1)]))
    assert _held(worker) == before == {1: (EXPECTED[:4], [0, 1], 8)}


def test_in_a_decode_batch_the_one_sequence_whose_table_is_full_is_named_and_nothing_changes() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1, 6]), _new(3, [2, 3]), _new(5, [4, 5, 7])]))
    decode_all = pb.ExecuteRequest(scheduled_sequences=[_decode(1), _decode(3), _decode(5)])
    for _ in range(3):  # positions 5, 6, 7: sequence 3's two blocks are full, the others have a third
        driver.execute(decode_all)
    before = _held(worker)

    with pytest.raises(InvalidStepError, match="^sequence 3 has 2 blocks, needs 3$"):
        driver.execute(decode_all)
    assert _held(worker) == before


def test_a_sequence_dropped_and_forked_anew_in_one_step_cannot_be_scheduled_in_it() -> None:
    worker = load_worker(STORIES_DIR, block_size=BLOCK_SIZE, num_blocks=8)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks=8)
    driver.execute(pb.ExecuteRequest(new_sequences=[_new(1, [0, 1]), _new(3, [2, 3])]))
    before = _held(worker)

    # Sibling 3 exists only once sequence 5's prompt is done (at the end of the step), so it cannot be scheduled here.
    with pytest.raises(InvalidStepError, match="scheduled sequence 3 is unknown or scheduled twice"):
        driver.execute(pb.ExecuteRequest(dropped_seq_ids=[3], new_sequences=[_new(5, [4, 5], fork_seq_ids=(3,))],
                                         scheduled_sequences=[_decode(3)]))
    assert _held(worker) == before
