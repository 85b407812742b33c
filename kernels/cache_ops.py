"""Launchers of cache_ops.cu: write_kv, copy_blocks, and swap_blocks between a device and a pinned host pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.fp8 import is_fp8
from pagedserve.kernels.launch_args import (
    SCALAR_TYPE_NAMES,
    float32,
    int32,
    int64,
    log2_exact,
    pointer,
    scalar_type_name,
)
from pagedserve.kernels.reference import TorchReferenceOps

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "cache_ops.cu"
THREADS = 128
# Raw copy units, widest first: the kernels move bits, so the element type only sets the unit size.
UNIT_TYPES: tuple[tuple[int, str], ...] = (
    (16, "uint4"), (8, "uint2"), (4, "unsigned int"), (2, "unsigned short"), (1, "unsigned char"),
)


def copy_unit(*byte_counts: int) -> tuple[int, str]:
    """Widest unit dividing every given size, address and stride in bytes: (unit bytes, C type)."""
    for unit_bytes, type_name in UNIT_TYPES:
        if all(count % unit_bytes == 0 for count in byte_counts):
            return unit_bytes, type_name
    raise AssertionError("the one-byte unit divides everything")


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launchers can ask for."""
    raw = [f"{kernel}<{unit}>" for kernel in ("write_kv", "copy_blocks") for _, unit in UNIT_TYPES]
    fp8 = [f"write_kv_fp8<{scalar}, {vec}>" for dtype, scalar in SCALAR_TYPE_NAMES.items()
           for vec in _fp8_vector_widths(dtype.itemsize)]
    return [*raw, "spread_block_tables", *fp8]


def _fp8_vector_widths(itemsize: int) -> list[int]:
    """Elements per load of write_kv_fp8: powers of two up to 16 bytes of the input."""
    return [1 << i for i in range((16 // itemsize).bit_length())]


def fp8_vector_width(itemsize: int, head_dim: int, *byte_counts: int) -> int:
    """The widest write_kv_fp8 vector dividing head_dim and, in input bytes, every address and stride given (the
    caches' addresses are counted in elements: one byte each)."""
    for vec in reversed(_fp8_vector_widths(itemsize)):
        if head_dim % vec == 0 and all(count % (vec * itemsize) == 0 for count in byte_counts):
            return vec
    raise AssertionError("a vector of one element divides everything")


class CacheOps:
    """write_kv / copy_blocks / swap_blocks on pools [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]."""

    def __init__(self, modules: ModuleCache, device: torch.device) -> None:
        self._modules = modules
        self._device = device
        self._fallback = TorchReferenceOps()

    def write_kv(self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                 slot_mapping: Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """key/value [num_tokens, num_kv_heads, head_dim] (token rows may be strided) into their slots; into an FP8
        cache as key / k_scale and value / v_scale."""
        num_tokens, num_kv_heads, head_dim = key.shape
        if num_tokens == 0:
            return
        if is_fp8(key_cache.dtype):
            self._write_kv_fp8(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
            return
        element_bytes = key.element_size()
        row_bytes = num_kv_heads * head_dim * element_bytes
        strides = [t.stride(0) * element_bytes for t in (key, value)]
        unit_bytes, unit = copy_unit(
            head_dim * element_bytes, *strides, *(t.data_ptr() for t in (key, value, key_cache, value_cache))
        )
        kernel = self._modules.kernel(SOURCE, f"write_kv<{unit}>")
        self._modules.launch(kernel, (num_tokens, 1, 1), (THREADS, 1, 1), (
            pointer(key), int64(strides[0] // unit_bytes), pointer(value), int64(strides[1] // unit_bytes),
            pointer(key_cache), pointer(value_cache), pointer(slot_mapping), int32(num_kv_heads),
            int32(row_bytes // num_kv_heads // unit_bytes), int32(log2_exact(key_cache.shape[2], "block_size")),
        ))

    def _write_kv_fp8(self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor, k_scale: float, v_scale: float) -> None:
        num_tokens, num_kv_heads, head_dim = key.shape
        itemsize = key.element_size()
        vec = fp8_vector_width(itemsize, head_dim, key.data_ptr(), value.data_ptr(), key.stride(0) * itemsize,
                               value.stride(0) * itemsize, key_cache.data_ptr() * itemsize,
                               value_cache.data_ptr() * itemsize)
        kernel = self._modules.kernel(SOURCE, f"write_kv_fp8<{scalar_type_name(key.dtype)}, {vec}>")
        threads = min(THREADS, max(32, -(-num_kv_heads * head_dim // vec // 32) * 32))
        self._modules.launch(kernel, (num_tokens, 1, 1), (threads, 1, 1), (
            pointer(key), int64(key.stride(0)), pointer(value), int64(value.stride(0)), pointer(key_cache),
            pointer(value_cache), pointer(slot_mapping), int32(num_kv_heads), int32(head_dim),
            int32(log2_exact(key_cache.shape[2], "block_size")), float32(k_scale), float32(v_scale),
        ))

    def copy_blocks(self, kv_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy every layer's K and V of block src into block dst; no dst may also be a src of this call."""
        self._copy(kv_cache, kv_cache, block_mapping)

    def swap_blocks(self, src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy blocks between pools; a kernel when both are device-accessible, else torch index copies."""
        if not (self._modules.is_device_accessible(src_cache) and self._modules.is_device_accessible(dst_cache)):
            self._fallback.swap_blocks(src_cache, dst_cache, block_mapping)
            return
        # The mapping is tiny; pinned staging keeps its upload asynchronous on the current stream.
        self._copy(src_cache, dst_cache, block_mapping.pin_memory().to(self._device, non_blocking=True))

    def spread_block_tables(self, packed: Tensor, block_tables: Tensor) -> None:
        """One launch over every row of block_tables, which reads the step's size from packed on the device."""
        rows, max_blocks = block_tables.shape
        if rows == 0:
            return
        kernel = self._modules.kernel(SOURCE, "spread_block_tables")
        self._modules.launch(kernel, (rows, 1, 1), (THREADS, 1, 1), (
            pointer(packed), pointer(block_tables), int32(max_blocks),
        ))

    def _copy(self, src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
        num_pairs = block_mapping.shape[0]
        if num_pairs == 0:
            return
        num_slabs = src.shape[0] * src.shape[1]
        block_bytes = src[0, 0, 0].numel() * src.element_size()
        unit_bytes, unit = copy_unit(block_bytes, src.data_ptr(), dst.data_ptr())
        kernel = self._modules.kernel(SOURCE, f"copy_blocks<{unit}>")
        self._modules.launch(kernel, (num_pairs, num_slabs, 1), (THREADS, 1, 1), (
            pointer(src), pointer(dst), pointer(block_mapping),
            int64(src.shape[2] * block_bytes // unit_bytes), int64(dst.shape[2] * block_bytes // unit_bytes),
            int64(block_bytes // unit_bytes),
        ))
