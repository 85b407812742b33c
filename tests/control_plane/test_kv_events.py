"""The engine's KV event log over a real BlockManager: numbered batches, one server's view over several lanes, a
lane that dies, the bounded replay buffer and the snapshot that replaces it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pagedserve.control_plane.scheduling.block_manager import BlockManager, hash_block
from pagedserve.control_plane.scheduling.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventLog,
    ReplayExpiredError,
)

BLOCK_SIZE = 4


def _log(max_batches: int = 8) -> KvEventLog:
    return KvEventLog(max_batches, schedule_flush=lambda flush: None)  # the test closes each batch itself


def _manager(log: KvEventLog, lane: int, num_blocks: int = 4) -> BlockManager:
    manager = BlockManager(num_blocks, 0, BLOCK_SIZE, enable_prefix_caching=True)
    manager.gpu.observer = log.lane(lane)
    return manager


def _fill(manager: BlockManager, seq_id: int, token_ids: list[int]) -> None:
    manager.create_table(seq_id)
    manager.allocate_slots(seq_id, 0, len(token_ids))
    manager.cache_full_blocks(seq_id, token_ids, len(token_ids))


def test_stored_blocks_chain_by_parent_and_batches_are_numbered() -> None:
    log = _log()
    manager = _manager(log, 0)
    tokens = list(range(10, 18))
    _fill(manager, 1, tokens)
    log.flush()
    first, second = hash_block(None, tokens[:4]), hash_block(hash_block(None, tokens[:4]), tokens[4:])
    (batch,) = log.batches_from(1)
    assert batch.sequence_number == 1
    assert batch.events == (BlockStored(first, None, tuple(tokens[:4])), BlockStored(second, first, tuple(tokens[4:])))


def test_a_block_leaves_when_its_last_lane_evicts_it() -> None:
    log = _log()
    lanes = [_manager(log, 0, num_blocks=2), _manager(log, 1, num_blocks=2)]
    tokens = [1, 2, 3, 4]
    for lane in lanes:
        _fill(lane, 1, tokens)
        lane.free(1)
    log.flush()
    _fill(lanes[0], 2, [5, 6, 7, 8, 9, 10, 11, 12])  # evicts lane 0's copy only
    log.flush()
    _fill(lanes[1], 2, [5, 6, 7, 8, 9, 10, 11, 12])  # and now lane 1's
    log.flush()
    events = [b.events for b in log.batches_from(1)]
    assert events[0] == (BlockStored(hash_block(None, tokens), None, (1, 2, 3, 4)),)
    assert BlockRemoved(hash_block(None, tokens)) not in events[1]
    assert events[2][0] == BlockRemoved(hash_block(None, tokens))


def test_a_dead_lane_removes_its_blocks_or_clears_all_when_nothing_is_left() -> None:
    log = _log()
    lanes = [_manager(log, 0), _manager(log, 1)]
    _fill(lanes[0], 1, [1, 2, 3, 4])
    _fill(lanes[1], 1, [5, 6, 7, 8])
    log.flush()
    log.lane_cleared(0)
    log.flush()
    log.lane_cleared(1)
    log.flush()
    assert log.batches_from(2)[0].events == (BlockRemoved(hash_block(None, [1, 2, 3, 4])),)
    assert log.batches_from(3)[0].events == (AllBlocksCleared(),)


def test_replay_past_the_buffer_is_refused_and_a_snapshot_rebuilds_the_cache() -> None:
    log = _log(max_batches=2)
    manager = _manager(log, 0, num_blocks=8)
    for seq_id, start in enumerate((0, 100, 200)):
        _fill(manager, seq_id, list(range(start, start + 8)))
        log.flush()
    with pytest.raises(ReplayExpiredError):
        log.batches_from(1)
    with pytest.raises(ReplayExpiredError):
        log.batches_from(5)  # a cursor from an earlier run of the engine
    assert not log.has_whole_history()
    snapshot = log.snapshot()
    assert snapshot[-1].sequence_number == 3
    events = [event for batch in snapshot for event in batch.events]
    assert events[0] == AllBlocksCleared()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == 6 and snapshot[0].snapshot is not None and snapshot[0].snapshot.num_blocks == 6
    known: set[bytes] = set()
    for event in stored:  # parents before children
        assert event.parent_hash is None or event.parent_hash in known
        known.add(event.block_hash)


def test_events_of_one_turn_close_into_one_batch_when_the_loop_runs() -> None:
    scheduled: list[Callable[[], None]] = []
    log = KvEventLog(8, schedule_flush=scheduled.append)
    manager = _manager(log, 0)
    _fill(manager, 1, list(range(8)))
    assert len(scheduled) == 1 and log.last_sequence_number == 0
    scheduled[0]()
    assert log.last_sequence_number == 1 and len(log.batches_from(1)[0].events) == 2
