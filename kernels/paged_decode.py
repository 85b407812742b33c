"""Launcher of paged_decode.cu: attention of single query rows over the paged KV cache, split-K when needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.fp8 import FP8_DTYPE, is_fp8
from pagedserve.kernels.launch_args import (
    SCALAR_TYPE_NAMES,
    address,
    element_bytes,
    int32,
    int64,
    log2_exact,
    pointer,
    scalar_type_name,
)
from pagedserve.kernels.prepared_launch import LayerArgs, PreparedLaunch
from pagedserve.kernels.tensor_map import TensorMap, rows_tensor_map

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "paged_decode.cu"
# Warps per CTA: MIN_WARPS (four CTAs per SM) unless decode_grid finds the grid short and sparse.
MIN_WARPS = 4
MAX_WARPS = 8
STAGES = 3  # cp.async pipeline depth per warp (4 measured no faster, and costs a resident CTA)
STAGE_TARGET_BYTES = 2048  # key (and as many value) bytes per warp tile: 12 KiB of stages per warp
MAX_HEADS_PER_CTA = 8
MAX_TILE_BLOCKS = 16  # blocks a tile may span, so that a warp's lanes hold the block ids of whole tiles
# MmaState: tensor-core dtypes and the head sizes whose 2 KiB tiles (16-bit: 16 or 8 tokens, e4m3: 32 or 16) fit
# its mma steps; over FP8 caches, for these query dtypes, too.
MMA_DTYPES = (torch.float16, torch.bfloat16)
MMA_HEAD_DIMS = (64, 128)
LANE_FLOAT_BUDGET = 32  # query floats per lane over a CTA's heads (as many accumulators): 4 CTAs per SM
MAX_UNSPLIT_TILES = 32  # a (row, head group) of at most this many tiles runs in one CTA: no merge launch
MAX_SPLITS = 512  # bounds the partial-result buffer and the reduce kernel's per-output loop
# Head sizes and GQA ratios of the models served; the source-compilation test instantiates each.
KNOWN_HEAD_DIMS = (8, 32, 64, 80, 96, 128, 256)
KNOWN_GROUP_SIZES = (1, 2, 4, 8)
KNOWN_BLOCK_SIZES = (1, 16)  # tiles differ only where MAX_TILE_BLOCKS binds, below 8 tokens per block
# The tensor memory accelerator stages MmaState tiles on sm_90 and later, in boxes of min(tile, block_size) rows:
# whole-block bulk copies streamed at 97 % of the read ceiling where 16-byte cp.async reached 93 % (notes, decode 18).
TMA_MIN_COMPUTE_CAPABILITY = 9
TMA_MIN_BLOCK_SIZE = 8  # a box of 8 rows is one repeat of the 128-byte swizzle
TMA_SHARED_BYTES = 2048  # the warps' barriers (1 KiB) and the alignment of the stages for the swizzle


@dataclass(frozen=True, slots=True)
class DecodeLayout:
    """Compile-time shape of one paged_decode instantiation (see the two State kinds in paged_decode.cu)."""

    scalar: str  # of query and out
    head_dim: int
    element_bytes: int  # of the caches
    uses_mma: bool  # MmaState (tensor cores) rather than LaneState (CUDA cores)
    vec: int  # LaneState: elements per vector load
    lanes: int  # LaneState: lanes covering one token row
    vecs: int  # LaneState: vectors per lane per token row
    heads_per_cta: int  # query heads of one GQA group handled by one CTA
    tile: int  # tokens per warp tile (one pipeline stage)
    tma_staged: bool  # MmaState tiles copied by the tensor memory accelerator (TmaPipeline)
    is_fp8_cache: bool = False  # e4m3 caches (either state), widened to the query's dtype as they are read

    @property
    def max_warps(self) -> int:
        """Warps per CTA this layout allows: its state must fit 128 registers (kThreadsPerSm in the source)."""
        if self.uses_mma:
            return MAX_WARPS
        passes = self.tile * self.lanes // 32
        lane_elems = self.vec * self.vecs
        return MAX_WARPS if 2 * self.heads_per_cta * lane_elems + passes * self.heads_per_cta <= 96 else MIN_WARPS

    @property
    def state_name(self) -> str:
        cache = ", fp8_e4m3_t" if self.is_fp8_cache else ""
        if self.uses_mma:
            staged = f", {str(self.tma_staged).lower()}{cache}" if self.tma_staged or cache else ""
            return f"MmaState<{self.scalar}, {self.head_dim}, {self.heads_per_cta}, {self.tile}{staged}>"
        return (f"LaneState<{self.scalar}, {self.head_dim}, {self.vec}, {self.lanes}, {self.vecs}, "
                f"{self.heads_per_cta}, {self.tile}{cache}>")

    def kernel_name(self, warps: int) -> str:
        return f"paged_decode<{self.state_name}, {32 * warps}, {STAGES}>"

    @property
    def reduce_name(self) -> str:
        return f"paged_decode_reduce<{self.scalar}, {self.head_dim}>"

    @property
    def row_stride(self) -> int:
        """Elements per staged token row: cp.async staging of 16-bit MmaState tiles pads rows by 16 bytes against
        ldmatrix bank conflicts (the swizzle of the tensor memory accelerator, and of every e4m3 tile, avoids them
        instead)."""
        is_padded = self.uses_mma and not self.tma_staged and not self.is_fp8_cache
        return self.head_dim + 16 // self.element_bytes if is_padded else self.head_dim

    def shared_bytes(self, warps: int) -> int:
        """Per-warp pipeline stages (keys and values), reused afterwards for the cross-warp merge."""
        stages = warps * STAGES * 2 * self.tile * self.row_stride * self.element_bytes
        merge = 4 * warps * self.heads_per_cta * (self.head_dim + 2)
        return max(stages, merge) + (TMA_SHARED_BYTES if self.tma_staged else 0)


def decode_layout(dtype: torch.dtype, head_dim: int, group_size: int, block_size: int,
                  tma: bool = False, cache_dtype: torch.dtype | None = None) -> DecodeLayout:
    """Tensor cores where the dtype and head size allow; otherwise the CUDA-core lane layout: 16-byte loads
    where head_dim allows, registers within LANE_FLOAT_BUDGET. Tiles hold at most MAX_TILE_BLOCKS blocks' tokens,
    or one CUDA-core pass of up to 32 tokens: either way a tile touches at most 32 blocks, as the kernel's
    block-id windows (one id per lane) need. tma: the device has the tensor memory accelerator, which then stages
    tensor-core tiles of blocks of at least TMA_MIN_BLOCK_SIZE tokens. cache_dtype: FP8 caches (of dtype
    otherwise) take the tensor cores where 16-bit caches would, else the lane layout with vectors as wide as the
    query's; either way with tiles of as many bytes (twice the tokens)."""
    is_fp8_cache = cache_dtype is not None and is_fp8(cache_dtype)
    size = 1 if is_fp8_cache else element_bytes(dtype)
    if (head_dim * size) % 4:
        raise ValueError(f"head_dim {head_dim} of {cache_dtype or dtype} is not a whole number of 4-byte words")
    heads = max(d for d in range(1, MAX_HEADS_PER_CTA + 1) if group_size % d == 0)
    tile_tokens = min(STAGE_TARGET_BYTES // (head_dim * size), MAX_TILE_BLOCKS * block_size)
    if dtype in MMA_DTYPES and head_dim in MMA_HEAD_DIMS:
        return DecodeLayout(scalar_type_name(dtype), head_dim, size, True, 0, 0, 0, heads, tile_tokens,
                            tma and block_size >= TMA_MIN_BLOCK_SIZE, is_fp8_cache)
    lane_floats = max(4, LANE_FLOAT_BUDGET // heads)
    vec = 1
    while vec * 2 <= min(16 // element_bytes(dtype), lane_floats) and head_dim % (vec * 2) == 0:
        vec *= 2
    num_vecs = head_dim // vec
    wanted_vecs = max(1, min(2, lane_floats // vec))
    lanes = min(32, 1 << max(0, math.ceil(math.log2(math.ceil(num_vecs / wanted_vecs)))))
    tokens_per_pass = 32 // lanes
    tile = max(tokens_per_pass, tile_tokens // tokens_per_pass * tokens_per_pass)
    return DecodeLayout(scalar_type_name(dtype), head_dim, size, False, vec, lanes, math.ceil(num_vecs / lanes),
                        heads, tile, False, is_fp8_cache)


def cta_warp_counts(max_warps: int) -> list[int]:
    """The CTA sizes decode_grid picks from: MIN_WARPS, doubling up to max_warps."""
    return [MIN_WARPS << i for i in range((max_warps // MIN_WARPS).bit_length())]


def known_name_expressions(tma: bool) -> list[str]:
    """Every kernel instantiation the launcher asks for on the known head sizes, GQA ratios and block sizes, on
    devices with (tma) or without the tensor memory accelerator."""
    names: set[str] = set()
    # FP8 caches serve 16-bit models in blocks of vLLM's default size (other instantiations compile on demand).
    cases = [(dtype, dtype, block_size) for dtype in SCALAR_TYPE_NAMES for block_size in KNOWN_BLOCK_SIZES]
    cases += [(dtype, FP8_DTYPE, KNOWN_BLOCK_SIZES[-1]) for dtype in MMA_DTYPES]
    for dtype, cache_dtype, block_size in cases:
        for head_dim in KNOWN_HEAD_DIMS:
            for group_size in KNOWN_GROUP_SIZES:
                layout = decode_layout(dtype, head_dim, group_size, block_size, tma, cache_dtype)
                names.add(layout.reduce_name)
                names.update(layout.kernel_name(warps) for warps in cta_warp_counts(layout.max_warps))
    return sorted(names)


@dataclass(frozen=True, slots=True)
class DecodeGrid:
    """Grid of one launch: x = (sequence or query row) * head groups + head group, z = context split."""

    num_rows: int
    num_head_groups: int  # (kv head, group of heads_per_cta query heads of it)
    num_splits: int
    warps: int  # per CTA

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.num_rows * self.num_head_groups, 1, self.num_splits)


def decode_grid(num_rows: int, num_kv_heads: int, group_size: int, layout: DecodeLayout, max_seq_len: int,
                num_sms: int) -> DecodeGrid:
    """Split the context only for grids of at most half as many CTAs as SMs (small batches), then size the CTAs.

    A split costs a second launch (the merge, ~3 us), so only grids that leave most SMs idle are split: up to one
    CTA per SM, at least one tile per warp of the longest context, and not at all for contexts of at most
    MAX_UNSPLIT_TILES tiles. Splitting any grid of more than half as many CTAs as SMs measured slower than not.
    CTAs get MAX_WARPS warps (shorter per-warp pipelines) when the grid has at most one CTA per SM and a
    MIN_WARPS CTA would give each warp at least 8 tiles; shorter CTAs gain nothing, and grids of more CTAs than
    SMs keep four CTAs per SM. With cp.async staging, CTAs of 16 or more tiles per warp measured as fast or
    slightly slower with eight warps and keep four; staged by the tensor memory accelerator they gain 1-2 %.
    """
    head_groups = num_kv_heads * (group_size // layout.heads_per_cta)
    base_ctas = max(1, num_rows * head_groups)
    num_tiles = math.ceil(max_seq_len / layout.tile)
    num_splits = 1
    if 2 * base_ctas <= num_sms and num_tiles > MAX_UNSPLIT_TILES:
        num_splits = max(1, min(MAX_SPLITS, num_sms // base_ctas, math.ceil(num_tiles / MIN_WARPS)))
    tiles_per_warp = math.ceil(num_tiles / num_splits) // MIN_WARPS
    is_sparse = base_ctas * num_splits <= num_sms
    is_long_enough = tiles_per_warp >= 8 if layout.tma_staged else 8 <= tiles_per_warp < 16
    warps = MAX_WARPS if is_sparse and is_long_enough and layout.max_warps >= MAX_WARPS else MIN_WARPS
    return DecodeGrid(num_rows, head_groups, num_splits, warps)


class PagedDecode:
    """Runs paged_decode, then paged_decode_reduce when the context is split.

    Rows are either one per sequence (rows_by_seq: only sequences with exactly one query row are served,
    as in decode steps and the decode part of mixed steps) or one per query row (any query length: each row
    attends to its own causal prefix).
    KV pool layout read: key_cache / value_cache [num_blocks, num_kv_heads, block_size, head_dim].
    tma: the device has the tensor memory accelerator (compute capability TMA_MIN_COMPUTE_CAPABILITY or later).
    """

    def __init__(self, modules: ModuleCache, num_sms: int, tma: bool) -> None:
        self._modules = modules
        self._num_sms = num_sms
        self._tma = tma
        self._layouts: dict[tuple[torch.dtype, torch.dtype, int, int, int], DecodeLayout] = {}

    def prepare(
        self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
        seq_lens: Tensor, query_start_loc: Tensor, max_seq_len: int, scale: float, rows_by_seq: bool,
    ) -> DecodeLaunch | None:
        """The launch over arguments already validated by the caller (see cuda_ops.CudaKernelOps), for any layer's
        caches of key_cache's shape and dtype; None when there is no row to attend."""
        num_kv_heads, block_size, head_dim = key_cache.shape[1:]
        num_q_heads = query.shape[1]
        group_size = num_q_heads // num_kv_heads
        layout = self._layout(query.dtype, key_cache.dtype, head_dim, group_size, block_size)
        num_seqs = seq_lens.shape[0]
        num_rows = num_seqs if rows_by_seq else query.shape[0]
        if num_rows == 0:
            return None
        grid = decode_grid(num_rows, num_kv_heads, group_size, layout, max_seq_len, self._num_sms)
        shared_bytes = layout.shared_bytes(grid.warps)
        kernel = self._modules.kernel(SOURCE, layout.kernel_name(grid.warps), shared_bytes)
        # One float32 buffer for the split partials: accumulators, then maxima, then sums (unused unsplit).
        split_slots = num_rows * num_q_heads * grid.num_splits if grid.num_splits > 1 else 0
        split_buffer = torch.empty(split_slots * (head_dim + 2), dtype=torch.float32, device=query.device)
        split_acc = split_buffer.data_ptr()
        split_max = split_acc + 4 * split_slots * head_dim
        split_sum = split_max + 4 * split_slots
        layer = LayerArgs(scale, layout.is_fp8_cache)
        main = PreparedLaunch(self._modules, kernel, grid.dims, (32 * grid.warps, 1, 1), (
            pointer(out), int64(out.stride(0)), pointer(query), int64(query.stride(0)),
            layer.key_cache, layer.value_cache, layer.key_map, layer.value_map, pointer(block_tables),
            int32(block_tables.stride(0)),
            int32(block_tables.shape[1]), pointer(seq_lens), pointer(query_start_loc), int32(num_seqs),
            int32(int(rows_by_seq)), int32(num_kv_heads), int32(group_size),
            int32(log2_exact(block_size, "block_size")), layer.qk_scale,
            layer.v_scale, address(split_acc),
            address(split_max), address(split_sum), int32(grid.num_splits),
        ), shared_bytes)
        reduce = None
        if grid.num_splits > 1:
            threads = -(-head_dim // 32) * 32  # one per output element
            reduce = PreparedLaunch(self._modules, self._modules.kernel(SOURCE, layout.reduce_name),
                                    (num_rows, num_q_heads, 1), (threads, 1, 1), (
                pointer(out), int64(out.stride(0)), pointer(seq_lens), pointer(query_start_loc), int32(num_seqs),
                int32(int(rows_by_seq)), address(split_acc), address(split_max), address(split_sum),
                int32(grid.num_splits),
            ))
        return DecodeLaunch(layout, layer, main, reduce, split_buffer)

    def _layout(self, dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, group_size: int,
                block_size: int) -> DecodeLayout:
        key = (dtype, cache_dtype, head_dim, group_size, block_size)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = decode_layout(dtype, head_dim, group_size, block_size, self._tma,
                                                        cache_dtype)
        return layout


class DecodeLaunch:
    """paged_decode (and its reduce, when the context is split) of one batch's rows, built once: launch() queues it
    over one layer's caches and scales, so the layers of a step share the validation and the arguments."""

    def __init__(self, layout: DecodeLayout, layer: LayerArgs, main: PreparedLaunch, reduce: PreparedLaunch | None,
                 split_buffer: Tensor) -> None:
        self._layout, self._layer, self._main, self._reduce = layout, layer, main, reduce
        self._split_buffer = split_buffer  # the launches write their partials here

    def launch(self, key_cache: Tensor, value_cache: Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Caches of the shape and dtype the launch was prepared for. An FP8 cache holds k / k_scale and v / v_scale;
        other caches ignore the scales."""
        layout = self._layout
        self._layer.set(key_cache, value_cache, k_scale, v_scale)
        if layout.tma_staged:
            self._layer.set_maps(*_tensor_maps(layout, key_cache, value_cache))
        self._main.launch()
        if self._reduce is not None:
            self._reduce.launch()


def _tensor_maps(layout: DecodeLayout, key_cache: Tensor, value_cache: Tensor) -> tuple[TensorMap, TensorMap]:
    """Each cache as rows of head_dim elements (one per block, kv head and slot), in boxes of a tile's rows or a whole
    block, whichever is smaller, and at most 128 bytes wide."""
    num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
    num_rows, box_rows = num_blocks * num_kv_heads * block_size, min(layout.tile, block_size)
    size = layout.element_bytes
    return (rows_tensor_map(key_cache.data_ptr(), num_rows, head_dim, box_rows, size),
            rows_tensor_map(value_cache.data_ptr(), num_rows, head_dim, box_rows, size))
