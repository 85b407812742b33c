"""Launcher of paged_prefill.cu: causal attention of query tiles over the paged KV cache on tensor cores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.fp8 import FP8_DTYPE, is_fp8
from pagedserve.kernels.launch_args import int32, int64, log2_exact, pointer, scalar_type_name
from pagedserve.kernels.prepared_launch import LayerArgs, PreparedLaunch

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import CompiledKernel, ModuleCache

SOURCE = "paged_prefill.cu"
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # beyond this the accumulators no longer fit in registers
KNOWN_HEAD_DIMS = (32, 64, 80, 96, 128)
MAX_GRID_Y = 65_535  # CUDA's limit on a grid's y dimension, where the query tiles go
WIDE_CTAS_PER_SM = 2  # wide_tiles' CTAs an SM holds at once (registers)


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Tile shape of one instantiation: `warps` warps of m_tiles x 16 query rows each, block_n keys per shared
    tile; min_ctas: CTAs an SM must hold at once (the compiler caps registers to fit them, spilling if need be)."""

    m_tiles: int
    block_n: int
    warps: int = 4
    min_ctas: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block_m(self) -> int:
        return 16 * self.m_tiles * self.warps


def wide_tiles(head_dim: int) -> PrefillTiles:
    """Two m-tiles per warp halve shared-memory reads per mma; narrower key tiles keep wide heads in registers.
    That takes about 220-250 registers a thread: two CTAs an SM."""
    return PrefillTiles(m_tiles=2, block_n=64 if head_dim <= 64 else 32)


def narrow_tiles(head_dim: int) -> PrefillTiles:
    """One m-tile per warp, over key tiles twice as wide: query tiles of half the rows, so twice the CTAs. Its
    shared memory (about 83-87 KB) still lets an SM hold two of them on an H100."""
    return PrefillTiles(m_tiles=1, block_n=2 * wide_tiles(head_dim).block_n)


def launcher_tiles(head_dim: int) -> tuple[PrefillTiles, PrefillTiles]:
    """The shapes tiles_for chooses between."""
    return wide_tiles(head_dim), narrow_tiles(head_dim)


def tiles_for(head_dim: int, num_q_heads: int, num_tokens: int, num_sms: int) -> PrefillTiles:
    """wide_tiles, unless its CTAs over num_tokens query rows fit in one wave (WIDE_CTAS_PER_SM an SM): then
    narrow_tiles. In one wave a launch lasts as long as its longest CTA, the last query tile of the longest prompt
    (it attends to every key); half-height tiles halve that. Beyond one wave the wide shape's fewer shared-memory
    reads per mma win. Calibrated on an H100 (sm_90, 228 KB of shared memory an SM; benchmarks.kernel_prefill_tiles,
    at 35f0a31, bf16 and FP8 caches): one prompt of 1,024 (256 wide CTAs) takes 0.90-0.93x the wide time at head size
    64 and 0.72-0.80x at 128; one chunk of 1,792 (448) takes 1.02-1.29x; no step between those two was measured.
    Two larger steps now run 3 % faster narrow (head size 128, 16-bit cache, c=64 and c=256 steps of 2,048 rows),
    which this rule does not follow. Decode rows beside the prompts count in num_tokens, though the kernel skips
    them: at the boundary such a step takes the wide shape."""
    wide = wide_tiles(head_dim)
    # The CTAs with query rows to compute, about: grid y (num_tile_slots) also holds a slot per sequence for the
    # rounding of each one's last tile, most of which exit at once.
    if num_q_heads * math.ceil(num_tokens / wide.block_m) <= WIDE_CTAS_PER_SM * num_sms:
        return narrow_tiles(head_dim)
    return wide


def supports(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the tensor-core kernel handles this query dtype, cache dtype (the query's, or FP8) and head size
    (others use paged_decode per row)."""
    return (dtype in TENSOR_CORE_DTYPES and cache_dtype in (dtype, FP8_DTYPE) and head_dim % 16 == 0
            and head_dim <= MAX_HEAD_DIM)


def kernel_name(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, tiles: PrefillTiles) -> str:
    """The instantiation's name; the cache type (the query's by default) and min_ctas (1) are named when needed."""
    scalar = scalar_type_name(dtype)
    cache = "fp8_e4m3_t" if is_fp8(cache_dtype) else scalar
    tail = "" if cache == scalar else f", {cache}"
    if tiles.min_ctas != 1:
        tail = f", {cache}, {tiles.min_ctas}"
    return f"paged_prefill<{scalar}, {head_dim}, {tiles.m_tiles}, {tiles.block_n}, {tiles.threads}{tail}>"


def shared_bytes(cache_dtype: torch.dtype, head_dim: int, tiles: PrefillTiles) -> int:
    """Query tile plus two stages of key and value tiles, 16-bit rows padded by 8 elements. An FP8 cache stages
    unpadded e4m3 rows and adds one widened 16-bit key and value tile."""
    if is_fp8(cache_dtype):
        return (tiles.block_m + 2 * tiles.block_n) * (head_dim + 8) * 2 + 4 * tiles.block_n * head_dim
    return (tiles.block_m + 4 * tiles.block_n) * (head_dim + 8) * 2


def num_tile_slots(num_seqs: int, num_tokens: int, block_m: int) -> int:
    """Grid y: an upper bound on the query tiles of any batch of that many sequences and tokens."""
    slots = num_seqs + math.ceil(num_tokens / block_m)
    if slots > MAX_GRID_Y:
        raise ValueError(f"{num_seqs} sequences of {num_tokens} query tokens need {slots} query tiles, more than "
                         f"one launch takes ({MAX_GRID_Y})")
    return slots


def computed_rows(query_start_loc: Tensor, num_rows: int) -> Tensor:
    """Which of a step's num_rows query rows paged_prefill computes (bool [num_rows]): those of sequences with two
    or more; it leaves the others to paged_decode."""
    lens = query_start_loc.diff()
    return torch.repeat_interleave(lens >= 2, lens, output_size=num_rows)


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launcher asks for on the known head sizes, over caches of the query's dtype
    and FP8."""
    return [kernel_name(dtype, cache_dtype, d, tiles) for dtype in TENSOR_CORE_DTYPES
            for cache_dtype in (dtype, FP8_DTYPE) for d in KNOWN_HEAD_DIMS for tiles in launcher_tiles(d)]


class PagedPrefill:
    """Runs paged_prefill over every sequence with at least two query rows; others are skipped by the kernel.

    KV pool layout read: key_cache / value_cache [num_blocks, num_kv_heads, block_size, head_dim], in the query's
    dtype or FP8 (e4m3 holding k / k_scale and v / v_scale, compute capability 8.9 or later).
    """

    def __init__(self, modules: ModuleCache, num_sms: int) -> None:
        self._modules, self._num_sms = modules, num_sms
        self._loaded: set[tuple[torch.dtype, torch.dtype, int]] = set()

    def prepare(self, out: Tensor, query: Tensor, key_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                query_start_loc: Tensor, scale: float, tiles: PrefillTiles | None = None) -> PrefillLaunch:
        """The launch over arguments already validated by the caller (see cuda_ops.CudaKernelOps), for any layer's
        caches of key_cache's shape and dtype; tiles: another tile shape than tiles_for's (to compare them)."""
        num_kv_heads, block_size, head_dim = key_cache.shape[1:]
        num_q_heads = query.shape[1]
        num_seqs = seq_lens.shape[0]
        types = (query.dtype, key_cache.dtype, head_dim)
        if types not in self._loaded:  # both of tiles_for's shapes at once, so that no later step compiles one
            for shape in launcher_tiles(head_dim):
                self._kernel(*types, shape)
            self._loaded.add(types)
        tiles = tiles or tiles_for(head_dim, num_q_heads, query.shape[0], self._num_sms)
        smem = shared_bytes(key_cache.dtype, head_dim, tiles)
        kernel = self._kernel(*types, tiles)
        grid = (num_q_heads, num_tile_slots(num_seqs, query.shape[0], tiles.block_m), 1)
        layer = LayerArgs(scale, is_fp8(key_cache.dtype))
        launch = PreparedLaunch(self._modules, kernel, grid, (tiles.threads, 1, 1), (
            pointer(out), int64(out.stride(0)), pointer(query), int64(query.stride(0)),
            layer.key_cache, layer.value_cache, pointer(block_tables), int32(block_tables.stride(0)),
            pointer(seq_lens), pointer(query_start_loc), int32(num_seqs), int32(num_kv_heads),
            int32(num_q_heads // num_kv_heads), int32(log2_exact(block_size, "block_size")),
            layer.qk_scale, layer.v_scale,
        ), shared_bytes=smem)
        return PrefillLaunch(layer, launch)

    def _kernel(self, dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int,
                tiles: PrefillTiles) -> CompiledKernel:
        return self._modules.kernel(SOURCE, kernel_name(dtype, cache_dtype, head_dim, tiles),
                                    dynamic_shared_bytes=shared_bytes(cache_dtype, head_dim, tiles))


class PrefillLaunch:
    """paged_prefill of one batch, built once: launch() queues it over one layer's caches and scales."""

    def __init__(self, layer: LayerArgs, launch: PreparedLaunch) -> None:
        self._layer, self._launch = layer, launch

    def launch(self, key_cache: Tensor, value_cache: Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Caches of the shape and dtype the launch was prepared for. An FP8 cache holds k / k_scale and v / v_scale;
        other caches ignore the scales."""
        self._layer.set(key_cache, value_cache, k_scale, v_scale)
        self._launch.launch()
