"""The prefill launch's tile slots (CPU): enough for any batch of that many sequences and tokens, and a batch beyond
what one launch's grid takes is refused by name instead of failing in the driver."""

from __future__ import annotations

import pytest

from pagedserve.kernels.paged_prefill import MAX_GRID_Y, num_tile_slots


def test_every_sequence_gets_its_tiles_whatever_the_split_of_the_tokens() -> None:
    # 3 sequences of 129, 1 and 126 tokens over 128-row tiles need 2 + 1 + 1 tiles; the bound is 3 + ceil(256/128).
    assert num_tile_slots(3, 256, 128) == 5 >= 2 + 1 + 1


def test_a_batch_of_more_query_tiles_than_a_grid_takes_is_refused_with_its_counts() -> None:
    assert num_tile_slots(MAX_GRID_Y - 128, 128 * 128, 128) == MAX_GRID_Y
    with pytest.raises(ValueError, match=r"65407 sequences of 16512 query tokens need 65536 query tiles"):
        num_tile_slots(MAX_GRID_Y - 128, 129 * 128, 128)
