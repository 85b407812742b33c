"""Batch-invariant reference ops (CPU): a row's linear product and attention come out bit for bit the same whatever
rows share its call, so a sequence's results do not depend on the schedule."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.ops import get_kernel_ops
from pagedserve.kernels.reference import TorchReferenceOps

INVARIANT = TorchReferenceOps(batch_invariant=True)
BLOCK_SIZE = 16


@pytest.mark.parametrize(("out_features", "in_features"), [(192, 64), (64, 172), (512, 64), (384, 1024)])
@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_of_a_linear_is_the_row_computed_alone(out_features: int, in_features: int, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(out_features + in_features)
        weight = torch.randn(out_features, in_features, generator=gen)
        bias = torch.randn(out_features, generator=gen)
        rows = torch.randn(300, in_features, generator=gen)
        batch = INVARIANT.linear(rows, weight, bias)
        for first, count in ((0, 1), (7, 1), (3, 2), (40, 15), (100, 17), (0, 300)):
            assert torch.equal(INVARIANT.linear(rows[first:first + count], weight, bias), batch[first:first + count])
    finally:
        torch.set_num_threads(before)
    # The same products as F.linear's, summed in another order.
    torch.testing.assert_close(batch, torch.nn.functional.linear(rows, weight, bias), rtol=1e-4, atol=1e-4)


def test_a_linear_keeps_the_leading_dimensions() -> None:
    weight, x = torch.randn(6, 4), torch.randn(2, 3, 4)
    assert INVARIANT.linear(x, weight).shape == (2, 3, 6)
    torch.testing.assert_close(INVARIANT.linear(x, weight), x @ weight.T)


class _Sequence:
    """One sequence's keys and values in a shuffled paged pool, and its query rows."""

    def __init__(self, length: int, num_kv_heads: int, group_size: int, head_dim: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_blocks = -(-length // BLOCK_SIZE)
        self.key_cache = torch.randn(num_blocks + 3, num_kv_heads, BLOCK_SIZE, head_dim, generator=gen)
        self.value_cache = torch.randn(num_blocks + 3, num_kv_heads, BLOCK_SIZE, head_dim, generator=gen)
        self.block_table = torch.randperm(num_blocks + 3, generator=gen)[:num_blocks].to(torch.int32)
        self.query = torch.randn(length, num_kv_heads * group_size, head_dim, generator=gen)
        self.scale = head_dim ** -0.5

    def attend(self, ops: TorchReferenceOps, first: int, end: int) -> torch.Tensor:
        """Rows [first, end) as one chunk of a step: positions first .. end - 1 over the keys up to each."""
        out = torch.empty_like(self.query[first:end])
        ops.paged_attention(out, self.query[first:end], self.key_cache, self.value_cache, self.block_table[None],
                            torch.tensor([end], dtype=torch.int32), torch.tensor([0, end - first], dtype=torch.int32),
                            end - first, end, self.scale)
        return out


@pytest.mark.parametrize(("length", "group_size", "head_dim"), [(20, 2, 8), (77, 4, 64), (130, 1, 32)])
def test_a_prompts_attention_equals_its_chunks_and_its_decodes_bit_for_bit(length: int, group_size: int,
                                                                           head_dim: int) -> None:
    sequence = _Sequence(length, 2, group_size, head_dim, seed=length)
    whole = sequence.attend(INVARIANT, 0, length)
    split = length // 3
    chunks = torch.cat([sequence.attend(INVARIANT, 0, split), sequence.attend(INVARIANT, split, length)])
    decodes = torch.cat([sequence.attend(INVARIANT, position, position + 1) for position in range(length)])

    assert torch.equal(chunks, whole) and torch.equal(decodes, whole)
    torch.testing.assert_close(whole, sequence.attend(TorchReferenceOps(), 0, length))


def test_batch_invariant_ops_are_the_cpu_references_and_refused_on_cuda() -> None:
    ops = get_kernel_ops(torch.device("cpu"), batch_invariant=True)
    assert isinstance(ops, TorchReferenceOps) and ops.batch_invariant
    assert not TorchReferenceOps().batch_invariant
    with pytest.raises(ValueError, match="CPU worker only"):
        get_kernel_ops(torch.device("cuda"), batch_invariant=True)
