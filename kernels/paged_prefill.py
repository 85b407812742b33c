"""Launcher of paged_prefill.cu: causal attention of query tiles over the paged KV cache on tensor cores."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.launch_args import float32, int32, int64, log2_exact, pointer, scalar_type_name

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "paged_prefill.cu"
BLOCK_M = 64  # query rows per CTA, 16 per warp
BLOCK_N = 64  # keys per shared-memory tile
THREADS = 128
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # beyond this the accumulators no longer fit in registers
KNOWN_HEAD_DIMS = (32, 64, 80, 96, 128)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the tensor-core kernel handles this dtype and head size (others use paged_decode per row)."""
    return dtype in TENSOR_CORE_DTYPES and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM


def kernel_name(dtype: torch.dtype, head_dim: int) -> str:
    return f"paged_prefill<{scalar_type_name(dtype)}, {head_dim}, {BLOCK_M}, {BLOCK_N}, {THREADS}>"


def shared_bytes(head_dim: int) -> int:
    """Query tile plus two stages of key and value tiles, rows padded by 8 elements."""
    return (BLOCK_M + 4 * BLOCK_N) * (head_dim + 8) * 2


def num_tile_slots(num_seqs: int, num_tokens: int) -> int:
    """Grid x: an upper bound on the query tiles of any batch of that many sequences and tokens."""
    return num_seqs + math.ceil(num_tokens / BLOCK_M)


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launcher asks for on the known head sizes."""
    return [kernel_name(dtype, head_dim) for dtype in TENSOR_CORE_DTYPES for head_dim in KNOWN_HEAD_DIMS]


class PagedPrefill:
    """Runs paged_prefill over every sequence with at least two query rows; others are skipped by the kernel.

    KV pool layout read: key_cache / value_cache [num_blocks, num_kv_heads, block_size, head_dim].
    """

    def __init__(self, modules: ModuleCache) -> None:
        self._modules = modules

    def run(self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> None:
        """Launch over arguments already validated by the caller (see cuda_ops.CudaAttentionOps)."""
        num_kv_heads, block_size, head_dim = key_cache.shape[1:]
        num_q_heads = query.shape[1]
        num_seqs = seq_lens.shape[0]
        smem = shared_bytes(head_dim)
        kernel = self._modules.kernel(SOURCE, kernel_name(query.dtype, head_dim), dynamic_shared_bytes=smem)
        grid = (num_tile_slots(num_seqs, query.shape[0]), num_q_heads, 1)
        self._modules.launch(kernel, grid, (THREADS, 1, 1), (
            pointer(out), int64(out.stride(0)), pointer(query), int64(query.stride(0)),
            pointer(key_cache), pointer(value_cache), pointer(block_tables), int32(block_tables.stride(0)),
            pointer(seq_lens), pointer(query_start_loc), int32(num_seqs), int32(num_kv_heads),
            int32(num_q_heads // num_kv_heads), int32(log2_exact(block_size, "block_size")),
            float32(scale * math.log2(math.e)),
        ), shared_bytes=smem)
