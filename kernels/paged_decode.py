"""Launcher of paged_decode.cu: attention of single query rows over the paged KV cache, split-K when needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.launch_args import (
    SCALAR_TYPE_NAMES,
    address,
    element_bytes,
    float32,
    int32,
    int64,
    log2_exact,
    pointer,
    scalar_type_name,
)

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "paged_decode.cu"
THREADS = 128
WARPS = THREADS // 32
STAGES = 3  # cp.async pipeline depth per warp (4 measured no faster, and costs a resident CTA)
STAGE_TARGET_BYTES = 2048  # key (and as many value) bytes per warp tile: 48 KiB of stages per CTA
MAX_HEADS_PER_CTA = 8
LANE_FLOAT_BUDGET = 32  # query floats per lane over a CTA's heads (as many accumulators): 4 CTAs per SM
MIN_SPLIT_TOKENS = 256  # shorter splits would spend more time filling pipelines than streaming
WAVE_FILL_TOLERANCE = 0.05
MAX_WAVES = 4
MAX_SPLITS = 512  # bounds the partial-result buffer and the reduce kernel's per-output loop
REDUCE_THREADS = 128
# Head sizes and GQA ratios of the models served; the source-compilation test instantiates each.
KNOWN_HEAD_DIMS = (8, 32, 64, 80, 96, 128, 256)
KNOWN_GROUP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class DecodeLayout:
    """Compile-time shape of one paged_decode instantiation (see the lane layout in paged_decode.cu)."""

    scalar: str
    head_dim: int
    element_bytes: int
    vec: int  # elements per vector load
    lanes: int  # lanes covering one token row
    vecs: int  # vectors per lane per token row
    heads_per_cta: int  # query heads of one GQA group handled by one CTA
    tile: int  # tokens per warp tile (one pipeline stage)

    @property
    def kernel_name(self) -> str:
        return (
            f"paged_decode<{self.scalar}, {self.head_dim}, {self.vec}, {self.lanes}, {self.vecs}, "
            f"{self.heads_per_cta}, {THREADS}, {self.tile}, {STAGES}>"
        )

    @property
    def reduce_name(self) -> str:
        return f"paged_decode_reduce<{self.scalar}, {self.head_dim}>"

    @property
    def shared_bytes(self) -> int:
        """Per-warp pipeline stages (keys and values), reused afterwards for the cross-warp merge."""
        stages = WARPS * STAGES * 2 * self.tile * self.head_dim * self.element_bytes
        merge = 4 * WARPS * self.heads_per_cta * (self.head_dim + 2)
        return max(stages, merge)


def decode_layout(dtype: torch.dtype, head_dim: int, group_size: int) -> DecodeLayout:
    """Pick the lane layout: 16-byte loads where head_dim allows, registers within LANE_FLOAT_BUDGET."""
    if (head_dim * element_bytes(dtype)) % 4:
        raise ValueError(f"head_dim {head_dim} of {dtype} is not a whole number of 4-byte words")
    heads = max(d for d in range(1, MAX_HEADS_PER_CTA + 1) if group_size % d == 0)
    lane_floats = max(4, LANE_FLOAT_BUDGET // heads)
    size = element_bytes(dtype)
    vec = 1
    while vec * 2 <= min(16 // size, lane_floats) and head_dim % (vec * 2) == 0:
        vec *= 2
    num_vecs = head_dim // vec
    wanted_vecs = max(1, min(2, lane_floats // vec))
    lanes = min(32, 1 << max(0, math.ceil(math.log2(math.ceil(num_vecs / wanted_vecs)))))
    tokens_per_pass = 32 // lanes
    tile = max(tokens_per_pass, STAGE_TARGET_BYTES // (head_dim * size) // tokens_per_pass * tokens_per_pass)
    return DecodeLayout(scalar_type_name(dtype), head_dim, size, vec, lanes, math.ceil(num_vecs / lanes), heads,
                        tile)


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launcher asks for on the known head sizes and GQA ratios."""
    names: set[str] = set()
    for dtype in SCALAR_TYPE_NAMES:
        for head_dim in KNOWN_HEAD_DIMS:
            for group_size in KNOWN_GROUP_SIZES:
                layout = decode_layout(dtype, head_dim, group_size)
                names.update((layout.kernel_name, layout.reduce_name))
    return sorted(names)


@dataclass(frozen=True, slots=True)
class DecodeGrid:
    """Grid of one launch: x = sequence or query row, y = (kv head, head group), z = context split."""

    num_rows: int
    num_head_groups: int
    num_splits: int

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.num_rows, self.num_head_groups, self.num_splits)


def decode_grid(num_rows: int, num_kv_heads: int, group_size: int, heads_per_cta: int, max_seq_len: int,
                slots: int) -> DecodeGrid:
    """Split the context so that the grid fills whole waves of `slots` resident CTAs as evenly as possible.

    Among split counts up to max_seq_len / MIN_SPLIT_TOKENS, take the fewest whose waves are within
    WAVE_FILL_TOLERANCE (relative) of the best achievable fill (fewer splits: less partial-result traffic).
    """
    head_groups = num_kv_heads * (group_size // heads_per_cta)
    base_ctas = max(1, num_rows * head_groups)
    if base_ctas >= MAX_WAVES * slots:
        return DecodeGrid(num_rows, head_groups, 1)  # the last wave's tail is already small
    max_splits = max(1, min(MAX_SPLITS, math.ceil(max_seq_len / MIN_SPLIT_TOKENS)))
    # The best fills sit next to whole numbers of waves; checking those keeps this O(1) for long contexts.
    candidates = {1, max_splits}
    for waves in range(1, MAX_WAVES + 1):
        candidates.update((waves * slots // base_ctas, waves * slots // base_ctas + 1))
    splits = sorted(s for s in candidates if 1 <= s <= max_splits)

    def fill(num_splits: int) -> float:
        ctas = base_ctas * num_splits
        return ctas / (math.ceil(ctas / slots) * slots)

    best = max(fill(s) for s in splits)
    num_splits = next(s for s in splits if fill(s) >= best * (1 - WAVE_FILL_TOLERANCE))
    return DecodeGrid(num_rows, head_groups, num_splits)


class PagedDecode:
    """Runs paged_decode, then paged_decode_reduce when the context is split.

    Rows are either one per sequence (rows_by_seq: only sequences with exactly one query row are served,
    as in decode steps and the decode part of mixed steps) or one per query row (any query length: each row
    attends to its own causal prefix).
    KV pool layout read: key_cache / value_cache [num_blocks, num_kv_heads, block_size, head_dim].
    """

    def __init__(self, modules: ModuleCache, num_sms: int) -> None:
        self._modules = modules
        self._num_sms = num_sms
        self._layouts: dict[tuple[torch.dtype, int, int], DecodeLayout] = {}

    def run(
        self, out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
        seq_lens: Tensor, query_start_loc: Tensor, max_seq_len: int, scale: float, rows_by_seq: bool,
    ) -> None:
        """Launch over arguments already validated by the caller (see cuda_ops.CudaKernelOps)."""
        num_kv_heads, block_size, head_dim = key_cache.shape[1:]
        num_q_heads = query.shape[1]
        group_size = num_q_heads // num_kv_heads
        layout = self._layout(query.dtype, head_dim, group_size)
        num_seqs = seq_lens.shape[0]
        num_rows = num_seqs if rows_by_seq else query.shape[0]
        if num_rows == 0:
            return
        kernel = self._modules.kernel(SOURCE, layout.kernel_name, layout.shared_bytes)
        slots = self._num_sms * self._modules.resident_ctas(kernel, THREADS, layout.shared_bytes)
        grid = decode_grid(num_rows, num_kv_heads, group_size, layout.heads_per_cta, max_seq_len, slots)
        # One float32 buffer for the split partials: accumulators, then maxima, then sums (unused unsplit).
        split_slots = num_rows * num_q_heads * grid.num_splits if grid.num_splits > 1 else 0
        split_buffer = torch.empty(split_slots * (head_dim + 2), dtype=torch.float32, device=query.device)
        split_acc = split_buffer.data_ptr()
        split_max = split_acc + 4 * split_slots * head_dim
        split_sum = split_max + 4 * split_slots
        self._modules.launch(kernel, grid.dims, (THREADS, 1, 1), (
            pointer(out), int64(out.stride(0)), pointer(query), int64(query.stride(0)),
            pointer(key_cache), pointer(value_cache), pointer(block_tables), int32(block_tables.stride(0)),
            pointer(seq_lens), pointer(query_start_loc), int32(num_seqs), int32(int(rows_by_seq)),
            int32(num_kv_heads), int32(group_size), int32(log2_exact(block_size, "block_size")),
            float32(scale * math.log2(math.e)), address(split_acc), address(split_max), address(split_sum),
            int32(grid.num_splits),
        ), layout.shared_bytes)
        if grid.num_splits > 1:
            reduce = self._modules.kernel(SOURCE, layout.reduce_name)
            self._modules.launch(reduce, (num_rows, num_q_heads, 1), (REDUCE_THREADS, 1, 1), (
                pointer(out), int64(out.stride(0)), pointer(seq_lens), pointer(query_start_loc), int32(num_seqs),
                int32(int(rows_by_seq)), address(split_acc), address(split_max), address(split_sum),
                int32(grid.num_splits),
            ), 4 * grid.num_splits)

    def _layout(self, dtype: torch.dtype, head_dim: int, group_size: int) -> DecodeLayout:
        key = (dtype, head_dim, group_size)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = decode_layout(dtype, head_dim, group_size)
        return layout
