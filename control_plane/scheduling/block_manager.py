"""One worker's global block tables: slot allocation, prefix-cache hits, forks, copy-on-write and swap."""

from __future__ import annotations

import enum
import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pagedserve.control_plane.scheduling.block_pool import BlockHash, BlockPool


class Device(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The longest run of cached full blocks that starts a token sequence (never all of its tokens)."""

    block_ids: tuple[int, ...]
    block_hashes: tuple[BlockHash, ...]
    num_query_tokens: int
    num_tokens: int


class TableChange(NamedTuple):
    """What allocate_slots did to a table: table[start_index:] is now block_ids; copies run before the step."""

    start_index: int
    block_ids: tuple[int, ...]
    copies: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)


@dataclass(slots=True)
class _Table:
    block_ids: list[int]
    device: Device
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its leading full blocks, chained


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """A block's identity: its tokens and, through the parent's hash, every token before them."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Block tables of every sequence on one worker, over a device pool and a CPU swap pool.

    Invariants: each block's reference count equals the number of tables holding it (a table holds a block
    once per entry); a sequence's table lives on one device; table i covers token slots
    [i * block_size, (i + 1) * block_size). Only full blocks are ever cached or shared by a prefix hit, and
    a shared partial block (from a fork) is copied before anyone writes into it.
    """

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu = BlockPool(num_gpu_blocks, enable_caching=enable_prefix_caching)
        self.cpu = BlockPool(num_cpu_blocks, enable_caching=False)
        self._tables: dict[int, _Table] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # of them, tokens found cached

    def _pool(self, device: Device) -> BlockPool:
        return self.gpu if device is Device.GPU else self.cpu

    def has_table(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_ids(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._tables[seq_id].block_ids)

    def device(self, seq_id: int) -> Device:
        return self._tables[seq_id].device

    def seq_ids(self) -> tuple[int, ...]:
        return tuple(self._tables)

    def num_hashed_blocks(self, seq_id: int) -> int:
        """Leading full blocks of seq whose hashes are known (and cached, unless another block holds them)."""
        return len(self._tables[seq_id].block_hashes)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> CachedPrefix:
        """Longest prefix of cached full blocks, leaving at least one token to compute (for its logits)."""
        block_ids: list[int] = []
        hashes: list[BlockHash] = []
        if self.enable_prefix_caching:
            parent: BlockHash | None = None
            for index in range((len(token_ids) - 1) // self.block_size):
                start = index * self.block_size
                parent = hash_block(parent, token_ids[start : start + self.block_size])
                block_id = self.gpu.lookup(parent)
                if block_id is None:
                    break
                block_ids.append(block_id)
                hashes.append(parent)
        return CachedPrefix(tuple(block_ids), tuple(hashes), len(token_ids), len(block_ids) * self.block_size)

    def num_blocks_needed(self, seq_id: int, num_tokens: int, prefix: CachedPrefix | None = None) -> int:
        """Free blocks that growing seq's table to num_tokens slots takes: new blocks, plus prefix hits that
        now sit unreferenced in the free queue. A new sequence starts from prefix (or empty)."""
        table = self._tables.get(seq_id)
        if table is not None:
            return max(0, _cdiv(num_tokens, self.block_size) - len(table.block_ids))
        hits = prefix.block_ids if prefix else ()
        num_evictable = sum(1 for b in hits if self.gpu.ref_count(b) == 0)
        return num_evictable + max(0, _cdiv(num_tokens, self.block_size) - len(hits))

    def num_copies_needed(self, writes: Iterable[tuple[int, int]]) -> int:
        """Blocks copy-on-write takes when each (seq_id, first_slot) writes from first_slot on: a shared
        block written by k of its r holders costs k copies, or r - 1 when all of them write."""
        writers: dict[int, int] = {}
        for seq_id, first_slot in writes:
            for block_id in self._shared_tail(seq_id, first_slot):
                writers[block_id] = writers.get(block_id, 0) + 1
        return sum(min(k, self.gpu.ref_count(b) - 1) for b, k in writers.items())

    def _shared_tail(self, seq_id: int, first_slot: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            return []
        tail = table.block_ids[first_slot // self.block_size :]
        return [b for b in tail if self.gpu.ref_count(b) > 1]

    def create_table(self, seq_id: int, prefix: CachedPrefix | None = None) -> None:
        """Starts seq's device table with the prefix's cached blocks (one more holder each)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        hits = prefix.block_ids if prefix else ()
        self.gpu.touch(hits)
        self._tables[seq_id] = _Table(list(hits), Device.GPU, list(prefix.block_hashes if prefix else ()))
        if prefix is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += prefix.num_query_tokens
            self.prefix_cache_hits += prefix.num_tokens

    def allocate_slots(self, seq_id: int, first_slot: int, num_tokens: int) -> TableChange | None:
        """Makes slots [first_slot, num_tokens) of seq writable: copies shared blocks there, appends blocks.

            table:  | full | full | partial, shared |        |
            slots:  0 ...              first_slot ^    num_tokens ^
                                       copy-on-write ^   append  ^

        Returns None (and changes nothing) when the device pool has too few free blocks.
        """
        table = self._tables[seq_id]
        shared = self._shared_tail(seq_id, first_slot)
        num_new = _cdiv(num_tokens, self.block_size) - len(table.block_ids)
        if not self.gpu.can_allocate(len(shared) + max(0, num_new)):
            return None
        start_index = len(table.block_ids)
        copies = []
        for index in range(first_slot // self.block_size, len(table.block_ids)):
            src = table.block_ids[index]
            if self.gpu.ref_count(src) > 1:
                (dst,) = self.gpu.allocate(1)
                self.gpu.free([src])
                table.block_ids[index] = dst
                copies.append((src, dst))
                start_index = min(start_index, index)
        if num_new > 0:
            table.block_ids.extend(self.gpu.allocate(num_new))
        return TableChange(start_index, tuple(table.block_ids[start_index:]), tuple(copies))

    def append_slot(self, seq_id: int, slot: int) -> tuple[int, ...] | None:
        """allocate_slots for a device table that grows by the one slot `slot` (its next): a decode token.
        Returns the blocks appended to the table's end (none when the slot's block is its last), or None,
        changing nothing, when seq has no table, or that slot's block is shared (copy-on-write) or must be
        allocated with none free: the general path decides then."""
        table = self._tables.get(seq_id)
        if table is None:
            return None
        block_ids = table.block_ids
        index, num_blocks = slot // self.block_size, len(block_ids)
        if index == num_blocks - 1:
            return None if self.gpu.ref_count(block_ids[index]) > 1 else ()
        if index != num_blocks or not self.gpu.can_allocate(1):
            return None  # blocks past the slot's (only allocate_slots checks them all for sharing), a gap, or full
        appended = tuple(self.gpu.allocate(1))
        block_ids.extend(appended)
        return appended

    def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Registers seq's full blocks whose tokens are all known and computed (or scheduled to be)."""
        table = self._tables.get(seq_id)
        if table is None or not self.enable_prefix_caching or table.device is not Device.GPU:
            return
        num_full = min(num_computed_tokens, len(token_ids), len(table.block_ids) * self.block_size)
        for index in range(len(table.block_hashes), num_full // self.block_size):
            start = index * self.block_size
            parent = table.block_hashes[-1] if table.block_hashes else None
            block_tokens = token_ids[start : start + self.block_size]
            block_hash = hash_block(parent, block_tokens)
            table.block_hashes.append(block_hash)
            self.gpu.cache(table.block_ids[index], block_hash, parent, block_tokens)

    def fork(self, parent_seq_id: int, child_seq_id: int, num_tokens: int) -> None:
        """Gives child the parent's blocks that cover its first num_tokens slots, shared (ref count + 1)."""
        parent = self._tables[parent_seq_id]
        if child_seq_id in self._tables:
            raise ValueError(f"sequence {child_seq_id} already has a block table")
        block_ids = parent.block_ids[: _cdiv(num_tokens, self.block_size)]
        self._pool(parent.device).touch(block_ids)
        hashes = parent.block_hashes[: num_tokens // self.block_size]
        self._tables[child_seq_id] = _Table(list(block_ids), parent.device, list(hashes))

    def free(self, seq_id: int) -> None:
        """Releases seq's table; its blocks join the free queue tail first. Unknown seq: no-op."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self._pool(table.device).free(reversed(table.block_ids))

    def num_distinct_blocks(self, seq_ids: Iterable[int]) -> int:
        return len({b for s in seq_ids for b in self._tables[s].block_ids})

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        return self.cpu.can_allocate(self.num_distinct_blocks(seq_ids))

    def swap_out(self, seq_ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Moves the tables of seq_ids (device tables) to the CPU pool; returns (device, cpu) block pairs.
        Blocks they share stay shared on the CPU side."""
        return self._move(seq_ids, Device.CPU)

    def can_swap_in(self, seq_ids: Sequence[int], num_extra_blocks: int) -> bool:
        return self.gpu.can_allocate(self.num_distinct_blocks(seq_ids) + num_extra_blocks)

    def swap_in(self, seq_ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Moves the CPU tables of seq_ids back to new device blocks; returns (cpu, device) block pairs."""
        mapping = self._move(seq_ids, Device.GPU)
        for seq_id in seq_ids:
            table = self._tables[seq_id]
            # Only full blocks have hashes: block_hashes may be shorter than block_ids.
            for index, (block_id, block_hash) in enumerate(zip(table.block_ids, table.block_hashes, strict=False)):
                self.gpu.cache(block_id, block_hash, table.block_hashes[index - 1] if index else None)
        return mapping

    def _move(self, seq_ids: Sequence[int], dst_device: Device) -> tuple[tuple[int, int], ...]:
        dst_pool = self._pool(dst_device)
        mapping: dict[int, int] = {}
        for seq_id in seq_ids:
            table = self._tables[seq_id]
            if table.device is dst_device:
                raise ValueError(f"sequence {seq_id} is already on {dst_device.value}")
            src_pool = self._pool(table.device)
            new_ids = []
            for src in table.block_ids:
                if src in mapping:
                    dst_pool.touch([mapping[src]])
                else:
                    (mapping[src],) = dst_pool.allocate(1)
                new_ids.append(mapping[src])
            src_pool.free(reversed(table.block_ids))
            table.block_ids = new_ids
            table.device = dst_device
        return tuple(mapping.items())
