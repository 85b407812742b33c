"""The paged KV pool on the device and the CPU swap pool, with block moves done through the attention ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedserve.gpu_worker.errors import InvalidCacheRequestError
from pagedserve.kernels.ops import KernelOps


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Geometry of one pool: [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] of dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidCacheRequestError(f"block_size must be a power of two, got {self.block_size}")

    def shape(self, num_blocks: int) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        element_bytes = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_in(self, num_bytes: int) -> int:
        """Whole blocks that fit in num_bytes."""
        return max(num_bytes, 0) // self.bytes_per_block


class KVPool:
    """Owns the device pool and the swap pool; block ids index dim 2 of each. Never chooses blocks.

    The swap pool lives in pinned memory when the device is a GPU, so swaps are asynchronous DMA copies.
    """

    def __init__(
        self, layout: KVLayout, num_gpu_blocks: int, num_cpu_blocks: int, device: torch.device, ops: KernelOps
    ) -> None:
        if num_gpu_blocks <= 0:
            raise InvalidCacheRequestError(f"the KV pool needs at least one block, got {num_gpu_blocks}")
        self.layout = layout
        self.device = device
        self.ops = ops
        self.gpu_cache = torch.zeros(layout.shape(num_gpu_blocks), dtype=layout.dtype, device=device)
        self.cpu_cache = torch.zeros(
            layout.shape(num_cpu_blocks), dtype=layout.dtype, pin_memory=device.type == "cuda"
        )

    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu_cache.shape[2]

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu_cache.shape[2]

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def swap_out(self, mapping: Sequence[tuple[int, int]]) -> None:
        """Copies device blocks to swap blocks, rows of (device block, cpu block)."""
        if mapping:
            self.ops.swap_blocks(self.gpu_cache, self.cpu_cache, _mapping_tensor(mapping, torch.device("cpu")))

    def swap_in(self, mapping: Sequence[tuple[int, int]]) -> None:
        """Copies swap blocks back to device blocks, rows of (cpu block, device block)."""
        if mapping:
            self.ops.swap_blocks(self.cpu_cache, self.gpu_cache, _mapping_tensor(mapping, torch.device("cpu")))

    def copy_blocks(self, mapping: Sequence[tuple[int, int]]) -> None:
        """Copies device blocks onto other device blocks (copy-on-write), rows of (src, dst)."""
        if mapping:
            self.ops.copy_blocks(self.gpu_cache, _mapping_tensor(mapping, self.device))


def _mapping_tensor(mapping: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[M, 2] int64 (src, dst) rows."""
    return torch.tensor(mapping, dtype=torch.int64).view(-1, 2).to(device)
