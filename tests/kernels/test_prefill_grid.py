"""The prefill launch's tile slots (CPU): enough for any batch of that many sequences and tokens, and a batch beyond
what one launch's grid takes is refused by name instead of failing in the driver."""

from __future__ import annotations

import math

import pytest

from pagedserve.kernels.paged_prefill import MAX_GRID_Y, num_tile_slots

BLOCK_M = 128


@pytest.mark.parametrize("query_lens", [
    [256], [129, 1, 126], [1] * 64, [127] * 9, [2048, 1, 1, 1], [1000, 1048], [130, 130, 130, 130, 1],
])
def test_the_slots_cover_every_tile_of_the_batch(query_lens: list[int]) -> None:
    tiles = sum(math.ceil(q / BLOCK_M) for q in query_lens)
    assert num_tile_slots(len(query_lens), sum(query_lens), BLOCK_M) >= tiles


def test_a_batch_of_more_query_tiles_than_a_grid_takes_is_refused_with_its_counts() -> None:
    assert num_tile_slots(MAX_GRID_Y - 128, 128 * 128, BLOCK_M) == MAX_GRID_Y
    with pytest.raises(ValueError, match=r"65407 sequences of 16512 query tokens need 65536 query tiles"):
        num_tile_slots(MAX_GRID_Y - 128, 129 * 128, BLOCK_M)
