"""TorchReferenceOps against naive per-token loops on random paged inputs (CPU)."""

from __future__ import annotations

import math
from typing import TypedDict

import pytest
import torch

from pagedserve.kernels.ops import get_kernel_ops
from pagedserve.kernels.reference import TorchReferenceOps


class PagedCase(TypedDict):
    """paged_attention inputs over a random pool, with each sequence's context and query lengths."""

    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: list[int]
    q_lens: list[int]


def _naive_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    q_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """One query row and one head at a time, reading each context token through the block table."""
    out = torch.zeros(query.shape, dtype=torch.float32)
    num_q_heads, num_kv_heads = query.shape[1], key_cache.shape[1]
    block_size = key_cache.shape[2]
    row = 0
    for seq_index, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        for i in range(q_len):
            position = seq_len - q_len + i
            for head in range(num_q_heads):
                kv_head = head // (num_q_heads // num_kv_heads)
                keys, values = [], []
                for p in range(position + 1):
                    block = int(block_tables[seq_index, p // block_size])
                    keys.append(key_cache[block, kv_head, p % block_size].float())
                    values.append(value_cache[block, kv_head, p % block_size].float())
                scores = torch.stack(keys) @ query[row, head].float() * scale
                out[row, head] = torch.softmax(scores, dim=0) @ torch.stack(values)
            row += 1
    return out


def _random_case(
    seq_lens: list[int], q_lens: list[int], num_kv_heads: int, group_size: int, block_size: int,
    head_dim: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> PagedCase:
    """Random pool with each sequence's blocks scattered over shuffled block ids, junk table padding."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    used = 0
    for seq_index, count in enumerate(blocks_per_seq):
        block_tables[seq_index, :count] = order[used : used + count].to(torch.int32)
        used += count
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    num_tokens = sum(q_lens)
    return {
        "query": torch.randn(num_tokens, num_kv_heads * group_size, head_dim, generator=gen).to(dtype),
        "key_cache": torch.randn(shape, generator=gen).to(dtype),
        "value_cache": torch.randn(shape, generator=gen).to(dtype),
        "block_tables": block_tables,
        "seq_lens": seq_lens,
        "q_lens": q_lens,
    }


def _run_reference(case: PagedCase, scale: float) -> torch.Tensor:
    query = case["query"]
    q_lens = case["q_lens"]
    seq_lens = case["seq_lens"]
    out = torch.full_like(query, float("nan"))
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    TorchReferenceOps().paged_attention(
        out, query, case["key_cache"], case["value_cache"], case["block_tables"],
        torch.tensor(seq_lens, dtype=torch.int32), query_start_loc,
        max(q_lens), max(seq_lens), scale,
    )
    return out


def _naive(case: PagedCase, scale: float) -> torch.Tensor:
    return _naive_attention(
        case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
        case["seq_lens"], case["q_lens"], scale,
    )


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_decode_matches_naive_loop_with_partial_last_blocks(block_size: int, group_size: int) -> None:
    case = _random_case([1, 5, 16, 33], [1, 1, 1, 1], 2, group_size, block_size, seed=block_size + group_size)
    scale = 1 / math.sqrt(8)
    torch.testing.assert_close(_run_reference(case, scale), _naive(case, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_full_prefill_is_causal_by_position(block_size: int, group_size: int) -> None:
    case = _random_case([7, 20], [7, 20], 2, group_size, block_size, seed=10 + group_size)
    torch.testing.assert_close(_run_reference(case, 0.3), _naive(case, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_query_attends_to_cached_context(block_size: int) -> None:
    # Sequence 0: 13 cached + 6 new; sequence 1: 32 cached + 5 new crossing a block boundary.
    case = _random_case([19, 37], [6, 5], 1, 4, block_size, seed=3)
    torch.testing.assert_close(_run_reference(case, 0.5), _naive(case, 0.5), atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_idle_sequence_matches_naive_loop() -> None:
    case = _random_case([9, 4, 30, 17], [1, 0, 12, 1], 2, 2, 4, seed=4)
    torch.testing.assert_close(_run_reference(case, 0.35), _naive(case, 0.35), atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    case = _random_case([21, 3], [4, 1], 2, 2, 4, head_dim=16, dtype=torch.bfloat16, seed=5)
    got = _run_reference(case, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _naive(case, 0.25), atol=2e-2, rtol=2e-2)


def test_write_kv_stores_tokens_in_their_slots_and_skips_padding() -> None:
    gen = torch.Generator().manual_seed(6)
    key = torch.randn(4, 2, 8, generator=gen)
    value = torch.randn(4, 2, 8, generator=gen)
    key_cache = torch.zeros(3, 2, 4, 8)
    value_cache = torch.zeros(3, 2, 4, 8)
    TorchReferenceOps().write_kv(key, value, key_cache, value_cache, torch.tensor([9, -1, 0, 7]))
    expected_key = torch.zeros_like(key_cache)
    expected_value = torch.zeros_like(value_cache)
    for token, slot in ((0, 9), (2, 0), (3, 7)):
        expected_key[slot // 4, :, slot % 4] = key[token]
        expected_value[slot // 4, :, slot % 4] = value[token]
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_copy_blocks_copies_every_layer_k_and_v() -> None:
    pool = torch.randn(3, 2, 5, 2, 4, 8, generator=torch.Generator().manual_seed(7))
    before = pool.clone()
    TorchReferenceOps().copy_blocks(pool, torch.tensor([[1, 3], [4, 0]]))
    expected = before.clone()
    expected[:, :, 3] = before[:, :, 1]
    expected[:, :, 0] = before[:, :, 4]
    assert torch.equal(pool, expected)


def test_spread_block_tables_writes_the_steps_rows_and_columns_and_keeps_the_rest() -> None:
    tables = torch.full((4, 5), -1, dtype=torch.int32)
    packed = torch.tensor([2, 3, 10, 11, 12, 20, 21, 22, 99, 99], dtype=torch.int32)  # 2 rows of 3, then stale ints
    TorchReferenceOps().spread_block_tables(packed, tables)
    assert tables.tolist() == [[10, 11, 12, -1, -1], [20, 21, 22, -1, -1], [-1] * 5, [-1] * 5]


def test_swap_blocks_moves_blocks_between_pools_of_different_sizes() -> None:
    src = torch.randn(2, 2, 6, 2, 4, 8, generator=torch.Generator().manual_seed(8))
    dst = torch.zeros(2, 2, 3, 2, 4, 8)
    TorchReferenceOps().swap_blocks(src, dst, torch.tensor([[5, 0], [2, 2]]))
    expected = torch.zeros_like(dst)
    expected[:, :, 0] = src[:, :, 5]
    expected[:, :, 2] = src[:, :, 2]
    assert torch.equal(dst, expected)


def test_cpu_device_gets_the_torch_reference() -> None:
    assert isinstance(get_kernel_ops(torch.device("cpu")), TorchReferenceOps)
