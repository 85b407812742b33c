"""A fixed pool of KV blocks: reference counts, a free queue in eviction order, and the prefix-cache map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

BlockHash = bytes


class CacheObserver(Protocol):
    """Told of every change to a pool's prefix-cache map (scheduling/kv_events.py publishes them)."""

    def block_cached(self, block_hash: BlockHash, parent_hash: BlockHash | None,
                     token_ids: Sequence[int] | None) -> None:
        """block_hash now names a block; token_ids None when the caller no longer has the tokens (swap-in)."""

    def block_evicted(self, block_hash: BlockHash) -> None:
        """block_hash names no block any more."""


class _Unobserved:
    """The observer of a pool nobody watches."""

    def block_cached(self, block_hash: BlockHash, parent_hash: BlockHash | None,
                     token_ids: Sequence[int] | None) -> None:
        pass

    def block_evicted(self, block_hash: BlockHash) -> None:
        pass


class BlockPool:
    """Blocks 0..num_blocks-1 of one device (or of the CPU swap space).

    Invariants:
    - a block is in the free queue exactly when its reference count is 0, so
      num_free_blocks + num_used_blocks == num_blocks;
    - the free queue is in eviction order: allocation takes the front, a block whose last holder lets go
      joins the back, so among unreferenced cached blocks the least recently used is evicted first;
    - a block carries a hash only while it is the one block the cache map names for that hash.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.observer: CacheObserver = _Unobserved()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hashes[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def free_queue(self) -> tuple[int, ...]:
        """Free block ids, next to be allocated (evicted) first."""
        return tuple(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes num_blocks from the front of the free queue (evicting their cached contents), ref count 1."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Adds one holder to each block; an unreferenced cached block leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drops one holder from each block, in the given order; blocks left unreferenced join the back of
        the free queue in that order (so callers pass a table's tail first: tails are shared least)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} freed more often than held")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The cached block holding the tokens hashed to block_hash, if any."""
        return self._cached.get(block_hash)

    def cache(
        self, block_id: int, block_hash: BlockHash, parent_hash: BlockHash | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        """Names block_id as the holder of block_hash, unless another block already holds those tokens.
        parent_hash (the previous block's, None for a first block) and token_ids go to the observer only."""
        if not self.enable_caching or block_hash in self._cached or self._hashes[block_id] is not None:
            return
        self._cached[block_hash] = block_id
        self._hashes[block_id] = block_hash
        self.observer.block_cached(block_hash, parent_hash, token_ids)

    def _evict(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hashes[block_id] = None
            self.observer.block_evicted(block_hash)
