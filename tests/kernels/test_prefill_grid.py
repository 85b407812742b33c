"""The prefill launch's grid (CPU): its tile shape by the step's size, tile slots enough for any batch of that many
sequences and tokens, and a batch beyond what one launch's grid takes refused by name instead of failing in the
driver."""

from __future__ import annotations

import math

import pytest

from pagedserve.kernels.paged_prefill import (
    MAX_GRID_Y,
    PrefillTiles,
    narrow_tiles,
    num_tile_slots,
    tiles_for,
    wide_tiles,
)

BLOCK_M = 128
H100_SMS = 132


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_step_whose_wide_ctas_fit_one_wave_takes_the_narrow_tiles(head_dim: int) -> None:
    # 32 query heads: one prompt of 1,024 is 256 wide CTAs, two an SM fit 264; 1,025 rows are 288.
    assert tiles_for(head_dim, 32, 1024, H100_SMS) == narrow_tiles(head_dim)
    assert tiles_for(head_dim, 32, 1, H100_SMS) == narrow_tiles(head_dim)
    assert tiles_for(head_dim, 32, 1025, H100_SMS) == wide_tiles(head_dim)
    assert tiles_for(head_dim, 32, 16 * 1024, H100_SMS) == wide_tiles(head_dim)
    # Fewer SMs make one wave smaller.
    assert tiles_for(head_dim, 32, 1024, 64) == wide_tiles(head_dim)


@pytest.mark.parametrize(("head_dim", "wide", "narrow"), [
    (64, PrefillTiles(2, 64), PrefillTiles(1, 128)), (128, PrefillTiles(2, 32), PrefillTiles(1, 64)),
])
def test_the_narrow_tiles_hold_one_m_tile_a_warp_over_key_tiles_twice_as_wide(head_dim: int, wide: PrefillTiles,
                                                                             narrow: PrefillTiles) -> None:
    assert (wide_tiles(head_dim), narrow_tiles(head_dim)) == (wide, narrow)
    assert narrow_tiles(head_dim).block_m * 2 == wide_tiles(head_dim).block_m == BLOCK_M


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
