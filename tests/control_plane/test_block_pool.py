"""Block pool: reference counts, the free queue in eviction order, and the prefix-cache map."""

from __future__ import annotations

import pytest

from pagedserve.control_plane.scheduling.block_pool import BlockPool


def test_allocates_from_the_front_of_the_free_queue_with_one_holder() -> None:
    pool = BlockPool(4, enable_caching=True)
    assert pool.allocate(2) == [0, 1]
    assert (pool.ref_count(0), pool.ref_count(1), pool.ref_count(2)) == (1, 1, 0)
    assert pool.free_queue() == (2, 3)
    assert (pool.num_free_blocks, pool.num_used_blocks) == (2, 2)


def test_freed_blocks_join_the_back_in_the_given_order() -> None:
    pool = BlockPool(4, enable_caching=True)
    pool.allocate(3)
    pool.free([2, 0])
    assert pool.free_queue() == (3, 2, 0)
    assert pool.allocate(2) == [3, 2]


def test_block_stays_used_until_its_last_holder_frees_it() -> None:
    pool = BlockPool(2, enable_caching=True)
    pool.allocate(1)
    pool.touch([0])
    pool.free([0])
    assert (pool.ref_count(0), pool.is_free(0)) == (1, False)
    pool.free([0])
    assert (pool.ref_count(0), pool.is_free(0)) == (0, True)


def test_touching_an_unreferenced_cached_block_takes_it_out_of_the_free_queue() -> None:
    pool = BlockPool(3, enable_caching=True)
    pool.allocate(2)
    pool.cache(1, b"h1")
    pool.free([1])
    assert pool.free_queue() == (2, 1)
    pool.touch([pool.lookup(b"h1") or 0])
    assert pool.free_queue() == (2,)
    assert pool.ref_count(1) == 1


def test_allocating_a_cached_block_evicts_its_hash() -> None:
    pool = BlockPool(2, enable_caching=True)
    pool.allocate(1)
    pool.cache(0, b"h0")
    pool.free([0])
    assert pool.allocate(2) == [1, 0]
    assert pool.lookup(b"h0") is None
    assert pool.block_hash(0) is None


def test_first_block_cached_under_a_hash_keeps_it() -> None:
    pool = BlockPool(2, enable_caching=True)
    pool.allocate(2)
    pool.cache(0, b"same")
    pool.cache(1, b"same")
    assert pool.lookup(b"same") == 0
    assert pool.block_hash(1) is None


def test_caching_disabled_caches_nothing() -> None:
    pool = BlockPool(1, enable_caching=False)
    pool.allocate(1)
    pool.cache(0, b"h")
    assert pool.lookup(b"h") is None


def test_freeing_an_unheld_block_raises() -> None:
    pool = BlockPool(1, enable_caching=True)
    with pytest.raises(ValueError, match="block 0 freed more often than held"):
        pool.free([0])


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(2, enable_caching=True)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks, 2 free"):
        pool.allocate(3)
    assert pool.free_queue() == (0, 1)
    assert not pool.can_allocate(3)
    assert pool.can_allocate(2)
