"""Launcher of paged_prefill.cu: causal attention of query tiles over the paged KV cache on tensor cores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.launch_args import float32, int32, int64, log2_exact, pointer, scalar_type_name

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "paged_prefill.cu"
THREADS = 128
WARPS = THREADS // 32
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # beyond this the accumulators no longer fit in registers
KNOWN_HEAD_DIMS = (32, 64, 80, 96, 128)


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Tile shape of one instantiation: m_tiles x 16 query rows per warp, block_n keys per shared tile."""

    m_tiles: int
    block_n: int

    @property
    def block_m(self) -> int:
        return 16 * self.m_tiles * WARPS


def tiles_for(head_dim: int) -> PrefillTiles:
    """Two m-tiles per warp halve shared-memory reads per mma; narrower key tiles keep wide heads in registers."""
    return PrefillTiles(m_tiles=2, block_n=64 if head_dim <= 64 else 32)


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the tensor-core kernel handles this dtype and head size (others use paged_decode per row)."""
    return dtype in TENSOR_CORE_DTYPES and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM


def kernel_name(dtype: torch.dtype, head_dim: int, tiles: PrefillTiles) -> str:
    return f"paged_prefill<{scalar_type_name(dtype)}, {head_dim}, {tiles.m_tiles}, {tiles.block_n}, {THREADS}>"


def shared_bytes(head_dim: int, tiles: PrefillTiles) -> int:
    """Query tile plus two stages of key and value tiles, rows padded by 8 elements."""
    return (tiles.block_m + 4 * tiles.block_n) * (head_dim + 8) * 2


def num_tile_slots(num_seqs: int, num_tokens: int, block_m: int) -> int:
    """Grid x: an upper bound on the query tiles of any batch of that many sequences and tokens."""
    return num_seqs + math.ceil(num_tokens / block_m)


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launcher asks for on the known head sizes."""
    return [kernel_name(dtype, d, tiles_for(d)) for dtype in TENSOR_CORE_DTYPES for d in KNOWN_HEAD_DIMS]


class PagedPrefill:
    """Runs paged_prefill over every sequence with at least two query rows; others are skipped by the kernel.

    KV pool layout read: key_cache / value_cache [num_blocks, num_kv_heads, block_size, head_dim].
    """

    def __init__(self, modules: ModuleCache) -> None:
        self._modules = modules

    def run(self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
            seq_lens: Tensor, query_start_loc: Tensor, scale: float) -> None:
        """Launch over arguments already validated by the caller (see cuda_ops.CudaKernelOps)."""
        num_kv_heads, block_size, head_dim = key_cache.shape[1:]
        num_q_heads = query.shape[1]
        num_seqs = seq_lens.shape[0]
        tiles = tiles_for(head_dim)
        smem = shared_bytes(head_dim, tiles)
        kernel = self._modules.kernel(SOURCE, kernel_name(query.dtype, head_dim, tiles), dynamic_shared_bytes=smem)
        grid = (num_tile_slots(num_seqs, query.shape[0], tiles.block_m), num_q_heads, 1)
        self._modules.launch(kernel, grid, (THREADS, 1, 1), (
            pointer(out), int64(out.stride(0)), pointer(query), int64(query.stride(0)),
            pointer(key_cache), pointer(value_cache), pointer(block_tables), int32(block_tables.stride(0)),
            pointer(seq_lens), pointer(query_start_loc), int32(num_seqs), int32(num_kv_heads),
            int32(num_q_heads // num_kv_heads), int32(log2_exact(block_size, "block_size")),
            float32(scale * math.log2(math.e)),
        ), shared_bytes=smem)
