"""The vocabulary split by rows over the ranks: the embedding looks up its own rows and sums, the LM head gathers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear, linear
from pagedserve.gpu_worker.parallel.group import ParallelGroup
from pagedserve.gpu_worker.parallel.sharding import ShardLayout

if TYPE_CHECKING:
    from pagedserve.kernels.ops import KernelOps


class VocabParallel:
    """Embedding lookups and logits over weights of [V', hidden], this rank's vocabulary rows (see sharding.py).

    Neither synchronises with the host, so both can run inside CUDA graphs (their collectives included).
    """

    def __init__(self, layout: ShardLayout, group: ParallelGroup) -> None:
        self.group = group
        self.vocab_size = layout.config.vocab_size
        self.start = layout.vocab_start
        self.num_rows = layout.num_vocab_rows

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] int64 over the whole vocabulary -> [T, hidden]: each id's row, found on the one rank that
        holds it (the others contribute zeros to the sum)."""
        if self.group.size == 1:
            return F.embedding(input_ids, weight)
        local_ids = input_ids - self.start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_rows)
        rows = F.embedding(local_ids.masked_fill(elsewhere, 0), weight)
        rows.masked_fill_(elsewhere.unsqueeze(-1), 0)
        return self.group.all_reduce(rows)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | Fp8Linear, ops: KernelOps) -> torch.Tensor:
        """hidden: [R, hidden] -> [R, V] in hidden's dtype, contiguous: every rank's columns gathered, the padding
        cut off. The sampler reads a greedy batch's logits as they are and converts the others to float32."""
        local = linear(hidden, weight, ops)
        if self.group.size == 1:
            return local
        return self.group.all_gather_columns(local)[:, : self.vocab_size].contiguous()
