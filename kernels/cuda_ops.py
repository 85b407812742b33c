"""KernelOps on CUDA devices: CuPy-compiled kernels launched on torch's current stream, no host syncs."""

from __future__ import annotations

import torch
from torch import Tensor

from pagedserve.kernels.attention_step import AttentionStep, LayerLaunch, step_key
from pagedserve.kernels.cache_ops import CacheOps
from pagedserve.kernels.decode_gemv import DecodeGemv
from pagedserve.kernels.fp8 import FP8_DTYPE, is_fp8
from pagedserve.kernels.launch_args import SCALAR_TYPE_NAMES, log2_exact
from pagedserve.kernels.layer_kernels import LayerKernels
from pagedserve.kernels.module_cache import ModuleCache
from pagedserve.kernels.paged_decode import TMA_MIN_COMPUTE_CAPABILITY, PagedDecode
from pagedserve.kernels.paged_prefill import PagedPrefill, supports
from pagedserve.kernels.token_masks import TokenMaskKernels


class CudaKernelOps:
    """The KernelOps of pagedserve.kernels.ops for one CUDA device.

    KV pool layout: kv_cache [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim], contiguous;
    key_cache / value_cache are kv_cache[layer, 0] / kv_cache[layer, 1], in the model dtype or FP8 (e4m3 holding
    k / k_scale and v / v_scale; compute capability 8.9 or later). Every launch is asynchronous on
    torch.cuda.current_stream(), reads only device tensors and host ints, and so can be captured in a CUDA graph
    (after one eager call has compiled the kernels).
    """

    def __init__(self, device: torch.device, dependent_launch: bool = True) -> None:
        self._device = device
        modules = ModuleCache(device, dependent_launch)
        self.dependent_launches = modules.dependent_launches
        properties = torch.cuda.get_device_properties(device)
        self._decode = PagedDecode(modules, properties.multi_processor_count,
                                   tma=properties.major >= TMA_MIN_COMPUTE_CAPABILITY)
        self._prefill = PagedPrefill(modules, properties.multi_processor_count)
        self._cache = CacheOps(modules, device)
        # The layer ops are LayerKernels' bound methods themselves: no wrapper call on the per-layer host path.
        layers = LayerKernels(modules, properties.multi_processor_count)
        self.rms_norm = layers.rms_norm
        self.add_rms_norm = layers.add_rms_norm
        self.silu_and_mul = layers.silu_and_mul
        self.rms_norm_fp8 = layers.rms_norm_fp8
        self.add_rms_norm_fp8 = layers.add_rms_norm_fp8
        self.silu_and_mul_fp8 = layers.silu_and_mul_fp8
        self.rotary_write_kv = layers.rotary_write_kv
        self.quantize_fp8_per_row = layers.quantize_fp8_per_row
        self.scale_fp8_product = layers.scale_fp8_product
        gemv = DecodeGemv(modules)
        self.fp8_gemv = gemv.fp8_gemv
        self.linear = gemv.linear  # cuBLAS but for the few rows of a small 16-bit weight
        # The last step's attention, for its next layers (it holds its split buffer, at most about 1 MiB).
        self._attention_step: AttentionStep | None = None
        token_masks = TokenMaskKernels(modules)
        self.apply_token_masks = token_masks.apply_token_masks
        self.masked_argmax = token_masks.masked_argmax
        self.masked_argmax_into = token_masks.masked_argmax_into  # CUDA only: into buffers allocated ahead

    def write_kv(self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                 slot_mapping: Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        _check_cache(key_cache, value_cache)
        for name, tensor in (("key", key), ("value", value)):
            _check_rows(name, tensor, _rows_dtype(key_cache, key), key_cache.shape[1], key_cache.shape[3])
        _check_index("slot_mapping", slot_mapping, torch.int64, 1)
        if slot_mapping.shape[0] != key.shape[0] or value.shape[0] != key.shape[0]:
            raise ValueError(f"key {key.shape[0]}, value {value.shape[0]} and slot_mapping "
                             f"{slot_mapping.shape[0]} disagree on num_tokens")
        self._cache.write_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)

    def paged_attention(
        self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
        seq_lens: Tensor, query_start_loc: Tensor, max_query_len: int, max_seq_len: int, scale: float,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:
        """Dispatch by max_query_len (a host int, so no sync).

        1: paged_decode, one CTA row per sequence. Longer, with tensor-core support for the dtypes (16-bit
        queries over a cache of their dtype or FP8) and head size: paged_prefill for sequences of two or more query
        rows plus paged_decode for the single-row ones (mixed steps). Otherwise paged_decode with one CTA row per
        query row.

        The layers of a step call this with the same arguments but for their caches and scales: the first validates
        and builds the launches (step_key), the others only queue them over their caches, whose shape, strides and
        dtype the key holds.
        """
        key = step_key(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                       max_seq_len, scale)
        step = self._attention_step
        # A step's launches are kept for its next layers, but never into or out of a CUDA graph's capture: a graph
        # keeps the address of the split buffer its launches were built with, which must come from its own pool.
        is_capturing = torch.cuda.is_current_stream_capturing()
        if step is None or step.key != key or is_capturing:
            _check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
            if max_query_len <= 0 or query.shape[0] == 0:
                return
            step = AttentionStep(key, self._attention_launches(out, query, key_cache, value_cache, block_tables,
                                                               seq_lens, query_start_loc, max_query_len,
                                                               max_seq_len, scale))
            if not is_capturing:
                self._attention_step = step
        step.launch(key_cache, value_cache, k_scale, v_scale)

    def _attention_launches(self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                            block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, max_query_len: int,
                            max_seq_len: int, scale: float) -> list[LayerLaunch]:
        args = (out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
        launches: list[LayerLaunch] = []
        is_mixed = max_query_len > 1 and supports(query.dtype, key_cache.dtype, query.shape[2])
        if is_mixed:
            launches.append(self._prefill.prepare(out, query, key_cache, block_tables, seq_lens, query_start_loc,
                                                  scale))
        decode = self._decode.prepare(*args, max_seq_len, scale, rows_by_seq=is_mixed or max_query_len == 1)
        if decode is not None:
            launches.append(decode)
        return launches

    def copy_blocks(self, kv_cache: Tensor, block_mapping: Tensor) -> None:
        _check_pool("kv_cache", kv_cache)
        _check_index("block_mapping", block_mapping, torch.int64, 2)
        if block_mapping.device != kv_cache.device:
            raise ValueError(f"block_mapping must be on {kv_cache.device}, got {block_mapping.device}")
        self._cache.copy_blocks(kv_cache, block_mapping)

    def spread_block_tables(self, packed: Tensor, block_tables: Tensor) -> None:
        _check_index("packed", packed, torch.int32, 1)
        _check_index("block_tables", block_tables, torch.int32, 2)
        if packed.device != block_tables.device or not packed.is_cuda:
            raise ValueError(f"packed ({packed.device}) and block_tables ({block_tables.device}) must be on one CUDA "
                             "device")
        if packed.shape[0] < 2:
            raise ValueError(f"packed must hold at least its two-entry header, got {packed.shape[0]} entries")
        self._cache.spread_block_tables(packed, block_tables)

    def swap_blocks(self, src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
        _check_pool("src_cache", src_cache)
        _check_pool("dst_cache", dst_cache)
        if src_cache.dtype != dst_cache.dtype or src_cache.shape[:2] + src_cache.shape[3:] != (
            dst_cache.shape[:2] + dst_cache.shape[3:]
        ):
            raise ValueError(f"pools differ beyond num_blocks: {tuple(src_cache.shape)} {src_cache.dtype} vs "
                             f"{tuple(dst_cache.shape)} {dst_cache.dtype}")
        if block_mapping.dtype != torch.int64 or block_mapping.dim() != 2 or block_mapping.device.type != "cpu":
            raise ValueError("block_mapping must be a [num_pairs, 2] int64 CPU tensor")
        self._cache.swap_blocks(src_cache, dst_cache, block_mapping)


def _check_cache(key_cache: Tensor, value_cache: Tensor) -> None:
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4 or not cache.is_contiguous() or not cache.is_cuda:
            raise ValueError(f"{name} must be a contiguous CUDA [num_blocks, num_kv_heads, block_size, head_dim]"
                             f" tensor, got shape {tuple(cache.shape)} on {cache.device}")
        if cache.dtype not in SCALAR_TYPE_NAMES and cache.dtype != FP8_DTYPE:
            raise ValueError(f"{name} has unsupported dtype {cache.dtype}")
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} {key_cache.dtype} and value_cache "
                         f"{tuple(value_cache.shape)} {value_cache.dtype} differ")
    log2_exact(key_cache.shape[2], "block_size")


def _rows_dtype(cache: Tensor, rows: Tensor) -> torch.dtype:
    """The dtype query / key / value rows must have beside cache: the cache's, or any kernel dtype for FP8."""
    return rows.dtype if is_fp8(cache.dtype) and rows.dtype in SCALAR_TYPE_NAMES else cache.dtype


def _check_rows(name: str, tensor: Tensor, dtype: torch.dtype, num_heads: int | None, head_dim: int) -> None:
    """[num_tokens, num_heads, head_dim] with heads packed densely; token rows may be strided."""
    if tensor.dim() != 3 or tensor.dtype != dtype or not tensor.is_cuda:
        raise ValueError(f"{name} must be a CUDA [num_tokens, num_heads, head_dim] {dtype} tensor, "
                         f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    if (num_heads is not None and tensor.shape[1] != num_heads) or tensor.shape[2] != head_dim:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected heads {num_heads}, head_dim {head_dim}")
    if tensor.stride(2) != 1 or tensor.stride(1) != head_dim or tensor.stride(0) % head_dim:
        raise ValueError(f"{name} must have dense heads (strides (k * {head_dim}, {head_dim}, 1)), "
                         f"got {tensor.stride()}")


def _check_index(name: str, tensor: Tensor, dtype: torch.dtype, dims: int) -> None:
    if tensor.dtype != dtype or tensor.dim() != dims or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dims}-d {dtype} tensor, got {tuple(tensor.shape)} "
                         f"{tensor.dtype}")


def _check_pool(name: str, pool: Tensor) -> None:
    if pool.dim() != 6 or not pool.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [layers, 2, blocks, kv_heads, block_size, head_dim] tensor,"
                         f" got {tuple(pool.shape)}")


def _check_attention(out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, query_start_loc: Tensor) -> None:
    _check_cache(key_cache, value_cache)
    num_kv_heads, head_dim = key_cache.shape[1], key_cache.shape[3]
    _check_rows("query", query, _rows_dtype(key_cache, query), None, head_dim)
    _check_rows("out", out, query.dtype, query.shape[1], head_dim)
    if query.shape[1] % num_kv_heads or out.shape[0] != query.shape[0]:
        raise ValueError(f"query {tuple(query.shape)} / out {tuple(out.shape)} do not fit {num_kv_heads} kv heads")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [num_seqs, max_blocks] int32 with unit column stride, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype} strides {block_tables.stride()}")
    _check_index("seq_lens", seq_lens, torch.int32, 1)
    _check_index("query_start_loc", query_start_loc, torch.int32, 1)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"{num_seqs} sequences need query_start_loc of {num_seqs + 1} entries (got "
                         f"{query_start_loc.shape[0]}) and block_tables rows (got {block_tables.shape[0]})")
    devices = {t.device for t in (out, query, key_cache, block_tables, seq_lens, query_start_loc)}
    if len(devices) != 1:
        raise ValueError(f"attention tensors are spread over devices {sorted(map(str, devices))}")
