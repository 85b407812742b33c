"""The decode launch policy (CPU): which grids split the context and which CTAs get eight warps."""

from __future__ import annotations

import torch

from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.paged_decode import MAX_WARPS, MIN_WARPS, decode_grid, decode_layout

H100_SMS = 132
LAYOUT = decode_layout(torch.bfloat16, 64, 4, 16)  # Llama-3.2-1B: 8 kv heads of 4 query heads, 16-token tiles
TMA_LAYOUT = decode_layout(torch.bfloat16, 64, 4, 16, tma=True)


def test_a_batch_that_fills_the_sms_is_never_split() -> None:
    grid = decode_grid(16, 8, 4, LAYOUT, 2048, H100_SMS)
    assert (grid.num_splits, grid.warps) == (1, MIN_WARPS)
    assert grid.dims == (16 * 8, 1, 1)


def test_long_ctas_of_a_sparse_grid_get_eight_warps_only_when_staged_by_the_tensor_memory_accelerator() -> None:
    assert TMA_LAYOUT.tma_staged and not LAYOUT.tma_staged
    assert decode_grid(16, 8, 4, TMA_LAYOUT, 2048, H100_SMS).warps == MAX_WARPS
    assert decode_grid(16, 8, 4, LAYOUT, 2048, H100_SMS).warps == MIN_WARPS
    assert decode_grid(17, 8, 4, TMA_LAYOUT, 2048, H100_SMS).warps == MIN_WARPS  # more CTAs than SMs


def test_the_tensor_memory_accelerator_stages_tensor_core_tiles_of_blocks_of_eight_or_more_tokens() -> None:
    assert decode_layout(torch.float16, 128, 8, 8, tma=True).tma_staged
    assert not decode_layout(torch.bfloat16, 64, 4, 4, tma=True).tma_staged
    assert not decode_layout(torch.float32, 64, 4, 16, tma=True).tma_staged
    assert not decode_layout(torch.bfloat16, 8, 4, 16, tma=True).tma_staged


def test_one_long_context_is_split_into_about_one_cta_per_sm() -> None:
    grid = decode_grid(1, 8, 4, LAYOUT, 8192, H100_SMS)
    assert grid.num_splits == H100_SMS // 8
    assert grid.num_rows * grid.num_head_groups * grid.num_splits <= H100_SMS


def test_a_context_of_at_most_32_tiles_runs_unsplit_in_eight_warps_when_the_sms_are_idle() -> None:
    assert decode_grid(1, 8, 4, LAYOUT, 32 * LAYOUT.tile, H100_SMS).dims == (8, 1, 1)
    assert decode_grid(1, 8, 4, LAYOUT, 32 * LAYOUT.tile, H100_SMS).warps == MAX_WARPS
    assert decode_grid(1, 8, 4, LAYOUT, 32 * LAYOUT.tile + 1, H100_SMS).num_splits > 1


def test_fp8_caches_of_tensor_core_head_sizes_take_mma_state_with_tiles_of_as_many_bytes() -> None:
    for dtype, head_dim, tokens in [(torch.bfloat16, 64, 32), (torch.float16, 128, 16)]:
        layout = decode_layout(dtype, head_dim, 4, 16, tma=True, cache_dtype=FP8_DTYPE)
        assert (layout.uses_mma, layout.is_fp8_cache, layout.tma_staged) == (True, True, True)
        assert (layout.tile, layout.element_bytes, layout.row_stride) == (tokens, 1, head_dim)
        assert layout.tile * layout.row_stride == decode_layout(dtype, head_dim, 4, 16).tile * head_dim * 2
    name = decode_layout(torch.bfloat16, 64, 4, 16, tma=True, cache_dtype=FP8_DTYPE).kernel_name(MIN_WARPS)
    assert name == "paged_decode<MmaState<bfloat16_t, 64, 4, 32, true, fp8_e4m3_t>, 128, 3>"
    # cp.async staging (blocks under 8 tokens, or devices before sm_90) swizzles e4m3 rows instead of padding them.
    copied = decode_layout(torch.float16, 64, 8, 4, tma=True, cache_dtype=FP8_DTYPE)
    assert copied.state_name == "MmaState<half_t, 64, 8, 32, false, fp8_e4m3_t>"
    assert copied.shared_bytes(MIN_WARPS) == MIN_WARPS * 3 * 2 * 32 * 64


def test_fp8_caches_of_other_head_sizes_or_float32_queries_keep_lane_state() -> None:
    for dtype, head_dim in [(torch.bfloat16, 96), (torch.float16, 32), (torch.float32, 64)]:
        layout = decode_layout(dtype, head_dim, 4, 16, tma=True, cache_dtype=FP8_DTYPE)
        assert not layout.uses_mma and layout.is_fp8_cache
        assert layout.state_name.startswith("LaneState<") and layout.state_name.endswith(", fp8_e4m3_t>")
