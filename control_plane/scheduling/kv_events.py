"""The prefix cache's history as numbered batches of events (blocks stored, removed, all cleared) that a subscriber
outside the engine (the gateway's cache-aware routing) follows, with a bounded replay buffer and a snapshot."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.scheduling.block_pool import BlockHash, CacheObserver

log = structlog.get_logger()

# Batches kept for subscribers that reconnect (one batch per engine step that changed the cache). Past them a
# subscriber's cursor has expired: it gets ReplayExpiredError and starts over from a snapshot.
REPLAY_BATCHES = 4096
# Stored events per snapshot batch, so that no message of the snapshot grows with the cache.
SNAPSHOT_EVENTS_PER_BATCH = 512


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hash: BlockHash
    parent_hash: BlockHash | None  # the previous block's; None for a prompt's first block
    token_ids: tuple[int, ...]  # the block's block_size tokens


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hash: BlockHash


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    """Which part of a snapshot a batch is: batch `index` of `count`, over `num_blocks` live blocks in all."""

    index: int
    count: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    sequence_number: int  # 1, 2, ... without gaps
    timestamp_s: float  # time.time() when the batch closed
    events: tuple[KvEvent, ...]
    snapshot: SnapshotPart | None = None  # set on the batches of a snapshot


class ReplayExpiredError(PagedServeError):
    """The batches a subscriber asked for are no longer kept (or were never published by this engine)."""


class SubscriberBehindError(PagedServeError):
    """A subscriber fell behind by more than the kept batches: the next one it needs was dropped."""


@dataclass(slots=True)
class _LiveBlock:
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    lanes: set[int] = field(default_factory=set)  # the lanes whose pool holds the block


class KvEventLog:
    """The engine's prefix cache as one stream of events over all its lanes (workers).

    Invariants: a block hash is announced stored when its first lane caches it and removed when its last lane
    evicts it, so a subscriber sees one server whatever the number of workers; a lane whose cache is dropped at
    once (its worker died) removes its blocks, and AllBlocksCleared replaces the removals when nothing is left.
    The events of one turn of the event loop (one engine step) close into one batch when the loop next runs
    (schedule_flush); batches are numbered from 1 without gaps and the last REPLAY_BATCHES are kept.
    """

    def __init__(
        self, max_batches: int = REPLAY_BATCHES,
        schedule_flush: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        self._batches: deque[KvEventBatch] = deque(maxlen=max_batches)
        self._pending: list[KvEvent] = []
        self._live: dict[BlockHash, _LiveBlock] = {}
        self._schedule_flush = schedule_flush or (lambda flush: asyncio.get_running_loop().call_soon(flush))
        self._changed = asyncio.Event()
        self.last_sequence_number = 0
        self.num_unannounced = 0  # blocks cached again after their tokens were forgotten (swap-in)

    def lane(self, lane_index: int) -> CacheObserver:
        """The observer of one lane's device pool."""
        return _LaneObserver(self, lane_index)

    @property
    def oldest_sequence_number(self) -> int:
        """The first batch still kept; last_sequence_number + 1 when none is."""
        return self._batches[0].sequence_number if self._batches else self.last_sequence_number + 1

    @property
    def num_live_blocks(self) -> int:
        return len(self._live)

    def changed(self) -> asyncio.Event:
        """An event set when the next batch closes; call again after it fired for the one after."""
        return self._changed

    def batches_from(self, start: int) -> list[KvEventBatch]:
        """The kept batches numbered start and later; ReplayExpiredError when some of them are no longer kept or
        start lies beyond the next batch (a cursor from an earlier run of the engine)."""
        if start > self.last_sequence_number + 1:
            raise ReplayExpiredError(
                f"start_sequence_number {start} is past this engine's last batch {self.last_sequence_number} "
                "(the engine restarted): resubscribe from 0"
            )
        oldest = self.oldest_sequence_number
        if start < oldest:
            raise ReplayExpiredError(
                f"start_sequence_number {start} is older than the oldest batch kept ({oldest}): resubscribe from 0"
            )
        return list(self._batches)[start - oldest:]

    def has_whole_history(self) -> bool:
        """True while batch 1 is still kept (or none was published): replaying from 1 rebuilds the cache."""
        return self.oldest_sequence_number == 1

    def snapshot(self) -> list[KvEventBatch]:
        """The live cache as batches numbered up to last_sequence_number: AllBlocksCleared, then every live block
        stored, parents before children. Live batches continue after it with no gap. Empty when nothing was
        published yet."""
        if self.last_sequence_number == 0:
            return []
        events: list[KvEvent] = [AllBlocksCleared(), *self._stored_parents_first()]
        count = min(self.last_sequence_number, -(-len(events) // SNAPSHOT_EVENTS_PER_BATCH))
        size = -(-len(events) // count)
        now = time.time()
        first = self.last_sequence_number - count + 1
        return [
            KvEventBatch(first + index, now, tuple(events[index * size:(index + 1) * size]),
                         SnapshotPart(index, count, len(self._live)))
            for index in range(count)
        ]

    def flush(self) -> None:
        """Closes the pending events into the next batch and wakes the subscribers."""
        if not self._pending:
            return
        self.last_sequence_number += 1
        self._batches.append(KvEventBatch(self.last_sequence_number, time.time(), tuple(self._pending)))
        self._pending = []
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def lane_cleared(self, lane_index: int) -> None:
        """The lane's whole cache is gone at once (its worker died): its blocks leave, or everything is cleared."""
        gone = [block_hash for block_hash, block in self._live.items() if block.lanes == {lane_index}]
        for block in self._live.values():
            block.lanes.discard(lane_index)
        for block_hash in gone:
            del self._live[block_hash]
        if not gone:
            return
        if self._live:
            self._add(*(BlockRemoved(block_hash) for block_hash in gone))
        else:
            self._add(AllBlocksCleared())

    def stored(self, lane_index: int, block_hash: BlockHash, parent_hash: BlockHash | None,
               token_ids: Sequence[int] | None) -> None:
        block = self._live.get(block_hash)
        if block is None:
            if token_ids is None:
                self.num_unannounced += 1
                log.debug("kv_block_unannounced", reason="its tokens are no longer known")
                return
            block = self._live[block_hash] = _LiveBlock(parent_hash, tuple(token_ids))
            self._add(BlockStored(block_hash, parent_hash, block.token_ids))
        block.lanes.add(lane_index)

    def removed(self, lane_index: int, block_hash: BlockHash) -> None:
        block = self._live.get(block_hash)
        if block is None:
            return
        block.lanes.discard(lane_index)
        if not block.lanes:
            del self._live[block_hash]
            self._add(BlockRemoved(block_hash))

    def _add(self, *events: KvEvent) -> None:
        if not self._pending:
            self._schedule_flush(self.flush)
        self._pending.extend(events)

    def _stored_parents_first(self) -> list[BlockStored]:
        stored: list[BlockStored] = []
        emitted: set[BlockHash] = set()
        for block_hash in self._live:
            chain: list[BlockHash] = []
            cursor: BlockHash | None = block_hash
            while cursor is not None and cursor in self._live and cursor not in emitted:
                chain.append(cursor)
                emitted.add(cursor)
                cursor = self._live[cursor].parent_hash
            for link in reversed(chain):
                block = self._live[link]
                stored.append(BlockStored(link, block.parent_hash, block.token_ids))
        return stored


class _LaneObserver:
    """One lane's pool as the log sees it."""

    def __init__(self, events: KvEventLog, lane_index: int) -> None:
        self._events = events
        self._lane_index = lane_index

    def block_cached(self, block_hash: BlockHash, parent_hash: BlockHash | None,
                     token_ids: Sequence[int] | None) -> None:
        self._events.stored(self._lane_index, block_hash, parent_hash, token_ids)

    def block_evicted(self, block_hash: BlockHash) -> None:
        self._events.removed(self._lane_index, block_hash)
