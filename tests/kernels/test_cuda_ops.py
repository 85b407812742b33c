"""CuPy kernels against TorchReferenceOps on fresh random inputs (needs a CUDA GPU and CuPy)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.paged_decode import MAX_WARPS, PagedDecode, decode_grid, decode_layout
from pagedserve.kernels.paged_prefill import KNOWN_HEAD_DIMS, PrefillTiles, computed_rows, narrow_tiles, wide_tiles
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_GPU

pytestmark = NEEDS_GPU

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class PagedCase:
    """A random paged batch: each sequence's blocks scattered over a shuffled pool, junk past each table."""

    def __init__(self, seq_lens: list[int], q_lens: list[int], num_kv_heads: int, group_size: int,
                 head_dim: int, block_size: int, dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + 4
        order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
        width = max(blocks_per_seq) + 3
        self.block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), device="cuda", generator=gen,
                                          dtype=torch.int32)
        used = 0
        for seq, count in enumerate(blocks_per_seq):
            self.block_tables[seq, :count] = order[used : used + count]
            used += count
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.key_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        self.value_cache = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        self.query = torch.randn(sum(q_lens), num_kv_heads * group_size, head_dim, device="cuda",
                                 generator=gen).to(dtype)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        self.query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                                            device="cuda")
        self.max_query_len = max(q_lens)
        self.max_seq_len = max(seq_lens)
        self.scale = 1 / math.sqrt(head_dim)

    def poison_stale_slots(self) -> None:
        """NaN in every cache slot outside the sequences' contexts, as a reused pool may hold."""
        block_size = self.key_cache.shape[2]
        is_live = torch.zeros(self.key_cache.shape[0], block_size, dtype=torch.bool, device="cuda")
        for seq, seq_len in enumerate(self.seq_lens.tolist()):
            positions = torch.arange(seq_len, device="cuda")
            is_live[self.block_tables[seq, positions // block_size].long(), positions % block_size] = True
        for cache in (self.key_cache, self.value_cache):
            cache.masked_fill_(~is_live[:, None, :, None], float("nan"))

    def run_decode_staged_by_cp_async(self, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """The decode rows through a PagedDecode without the tensor memory accelerator, as on devices before
        sm_90 (the kernel ops of newer ones stage tensor-core tiles with it)."""
        from pagedserve.kernels.module_cache import ModuleCache  # imports CuPy, which only GPU hosts have

        device = torch.device("cuda", torch.cuda.current_device())
        decode = PagedDecode(ModuleCache(device), torch.cuda.get_device_properties(device).multi_processor_count,
                             tma=False)
        out = torch.full_like(self.query, float("nan"))
        launch = decode.prepare(out, self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                                self.query_start_loc, self.max_seq_len, self.scale, True)
        assert launch is not None
        launch.launch(self.key_cache, self.value_cache, k_scale, v_scale)
        return out

    def run_prefill(self, tiles: PrefillTiles, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """paged_prefill alone, in `tiles`: the rows of sequences of one query row stay NaN."""
        from pagedserve.kernels.module_cache import ModuleCache  # imports CuPy, which only GPU hosts have
        from pagedserve.kernels.paged_prefill import PagedPrefill

        device = torch.device("cuda", torch.cuda.current_device())
        prefill = PagedPrefill(ModuleCache(device), torch.cuda.get_device_properties(device).multi_processor_count)
        out = torch.full_like(self.query, float("nan"))
        prefill.prepare(out, self.query, self.key_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                        self.scale, tiles).launch(self.key_cache, self.value_cache, k_scale, v_scale)
        return out

    def prompt_rows(self) -> torch.Tensor:
        """The query rows of sequences of two or more (those paged_prefill computes)."""
        return computed_rows(self.query_start_loc, self.query.shape[0])

    def run(self, ops: KernelOps) -> torch.Tensor:
        out = torch.full_like(self.query, float("nan"))  # unwritten rows stay NaN and fail the comparison
        ops.paged_attention(out, self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens,
                            self.query_start_loc, self.max_query_len, self.max_seq_len, self.scale)
        return out


def _assert_matches_reference(case: PagedCase, ops: KernelOps, dtype: torch.dtype) -> None:
    got = case.run(ops)
    expected = case.run(TorchReferenceOps())
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_reference(ops: KernelOps, dtype: torch.dtype, head_dim: int, group_size: int,
                                  block_size: int) -> None:
    # Single token, one block exactly, one past a boundary, partial last blocks, several chunks.
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 5, 700]
    case = PagedCase(seq_lens, [1] * len(seq_lens), 2, group_size, head_dim, block_size, dtype, seed=block_size)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "block_size"), [(80, 8), (96, 16), (8, 1), (8, 2), (64, 4)])
def test_decode_of_tiles_that_straddle_blocks_or_span_many(ops: KernelOps, dtype: torch.dtype, head_dim: int,
                                                           block_size: int) -> None:
    # Tiles of 4 to 12 tokens cross 8- and 16-token block boundaries; blocks of 1 to 4 tokens put up to 32 block
    # ids in one tile. The long contexts run each warp over several windows of block ids.
    seq_lens = [1, 3 * block_size + 1, 40 * block_size - 3, 700]
    case = PagedCase(seq_lens, [1] * len(seq_lens), 2, 4, head_dim, block_size, dtype, seed=head_dim + block_size)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (64, 32), (128, 8), (8, 16)])
def test_stale_nan_in_slots_past_each_context_never_reaches_the_output(ops: KernelOps, dtype: torch.dtype,
                                                                       head_dim: int, block_size: int) -> None:
    # Decodes ending mid-block and mid-tile, a one-token context, and a prefill chunk (mixed step).
    seq_lens = [1, block_size + 3, 5 * block_size - 1, 300]
    case = PagedCase(seq_lens, [1, 1, 1, 9], 2, 4, head_dim, block_size, dtype, seed=head_dim + block_size)
    case.poison_stale_slots()
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_staged_by_cp_async_matches_reference(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    seq_lens = [1, block_size + 1, 3 * block_size - 5, 700]
    case = PagedCase(seq_lens, [1] * len(seq_lens), 2, 4, head_dim, block_size, dtype, seed=block_size)
    case.poison_stale_slots()
    got = case.run_decode_staged_by_cp_async()
    expected = case.run(TorchReferenceOps())
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_splits_long_contexts(ops: KernelOps, dtype: torch.dtype) -> None:
    case = PagedCase([16384, 9000, 130], [1, 1, 1], 2, 4, 128, 16, dtype, seed=1)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_of_short_contexts_in_one_cta_of_eight_warps(ops: KernelOps, dtype: torch.dtype,
                                                           head_dim: int) -> None:
    # A short batch of contexts of 32 tiles: unsplit, and the CTAs sparse enough for eight warps each.
    layout = decode_layout(dtype, head_dim, 4, 16)
    seq_lens = [32 * layout.tile, 32 * layout.tile - 7, 3 * layout.tile + 1, 1]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = decode_grid(len(seq_lens), 8, 4, layout, max(seq_lens), num_sms)
    assert (grid.num_splits, grid.warps) == (1, MAX_WARPS)
    case = PagedCase(seq_lens, [1] * len(seq_lens), 8, 4, head_dim, 16, dtype, seed=head_dim)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("group_size", [1, 4])
def test_prefill_is_causal_over_chunks_and_cached_context(ops: KernelOps, dtype: torch.dtype, head_dim: int,
                                                          group_size: int) -> None:
    # Full prefills, and chunks whose earlier tokens are already in the pool.
    case = PagedCase([77, 300, 64, 129], [77, 45, 16, 2], 2, group_size, head_dim, 16, dtype, seed=head_dim)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 32])
def test_mixed_batch_of_decodes_prefills_and_idle_sequences(ops: KernelOps, dtype: torch.dtype,
                                                            block_size: int) -> None:
    case = PagedCase([33, 1000, 5, 200, 17], [1, 130, 0, 1, 17], 4, 8, 64, block_size, dtype, seed=7)
    _assert_matches_reference(case, ops, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", KNOWN_HEAD_DIMS)  # 80 and 96 split some tiles' copies unevenly over the threads
@pytest.mark.parametrize("tiles_of", [wide_tiles, narrow_tiles], ids=["wide", "narrow"])
def test_each_prefill_tile_shape_of_the_launcher_matches_reference(dtype: torch.dtype, head_dim: int,
                                                                   tiles_of: Callable[[int], PrefillTiles]) -> None:
    # Full prompts (one of 300 rows: three wide query tiles), a chunk over cached context, a decode, an idle sequence.
    tiles = tiles_of(head_dim)
    case = PagedCase([77, 300, 1000, 5, 200, 17], [77, 300, 130, 0, 1, 17], 2, 4, head_dim, 16, dtype, seed=head_dim)
    case.poison_stale_slots()
    rows = case.prompt_rows()
    got, expected = case.run_prefill(tiles)[rows], case.run(TorchReferenceOps())[rows]
    assert rows.sum() == 77 + 300 + 130 + 17 and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_prefill_of_a_long_prompt(ops: KernelOps) -> None:
    case = PagedCase([4096], [4096], 8, 4, 128, 16, torch.bfloat16, seed=8)
    _assert_matches_reference(case, ops, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_places_strided_rows_and_skips_padding(ops: KernelOps, dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(9)
    num_tokens, num_kv_heads, head_dim = 6, 2, 64
    # key and value are views into one fused projection, as the model produces them.
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device="cuda", generator=gen).to(dtype)
    key = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([17, -1, 0, 31, -1, 8], dtype=torch.int64, device="cuda")
    caches = [torch.randn(4, num_kv_heads, 16, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    caches += [cache.clone() for cache in caches]
    ops.write_kv(key, value, caches[0], caches[1], slots)
    TorchReferenceOps().write_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3])


def test_copy_blocks_copies_all_layers_exactly(ops: KernelOps) -> None:
    gen = torch.Generator(device="cuda").manual_seed(10)
    pool = torch.randn(3, 2, 12, 4, 16, 64, device="cuda", generator=gen).to(torch.bfloat16)
    expected = pool.clone()
    mapping = torch.tensor([[1, 7], [4, 0], [1, 9]], dtype=torch.int64, device="cuda")
    ops.copy_blocks(pool, mapping)
    TorchReferenceOps().copy_blocks(expected, mapping)
    assert torch.equal(pool, expected)


def _packed_tables(num_seqs: int, width: int, capacity: int, gen: torch.Generator) -> torch.Tensor:
    """A decode step's packed tables (header num_seqs, width, then random block ids) in a buffer of capacity ints."""
    packed = torch.full((capacity,), -7, dtype=torch.int32, device="cuda")
    packed[:2] = torch.tensor([num_seqs, width], dtype=torch.int32)
    packed[2 : 2 + num_seqs * width] = torch.randint(0, 1 << 20, (num_seqs * width,), generator=gen, device="cuda",
                                                     dtype=torch.int32)
    return packed


def test_spread_block_tables_replayed_from_one_graph_serves_every_step_size(ops: KernelOps) -> None:
    gen = torch.Generator(device="cuda").manual_seed(13)
    rows, max_blocks = 48, 300
    packed = _packed_tables(40, 257, 2 + rows * max_blocks, gen)
    tables = torch.randint(0, 1 << 20, (rows, max_blocks), generator=gen, device="cuda", dtype=torch.int32)
    expected = tables.clone()
    ops.spread_block_tables(packed, tables)  # eager: also compiles the kernel before capture
    TorchReferenceOps().spread_block_tables(packed, expected)
    assert torch.equal(tables, expected)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ops.spread_block_tables(packed, tables)
    for num_seqs, width in [(1, 1), (48, 300), (7, 3), (0, 5)]:  # each step writes its own packed tables in place
        packed.copy_(_packed_tables(num_seqs, width, packed.shape[0], gen))
        graph.replay()
        TorchReferenceOps().spread_block_tables(packed, expected)
        torch.cuda.synchronize()
        assert torch.equal(tables, expected), (num_seqs, width)


@pytest.mark.parametrize("pinned", [True, False])
def test_swap_out_and_back_in_restores_blocks(ops: KernelOps, pinned: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(11)
    gpu_pool = torch.randn(2, 2, 10, 4, 16, 64, device="cuda", generator=gen).to(torch.float16)
    cpu_pool = torch.zeros(2, 2, 6, 4, 16, 64, dtype=torch.float16, pin_memory=pinned)
    ops.swap_blocks(gpu_pool, cpu_pool, torch.tensor([[3, 5], [8, 0]]))
    torch.cuda.synchronize()
    assert torch.equal(cpu_pool[:, :, 5], gpu_pool[:, :, 3].cpu())
    assert torch.equal(cpu_pool[:, :, 0], gpu_pool[:, :, 8].cpu())
    assert not cpu_pool[:, :, 1:5].any()
    restored = torch.zeros_like(gpu_pool)
    ops.swap_blocks(cpu_pool, restored, torch.tensor([[5, 3], [0, 8]]))
    assert torch.equal(restored[:, :, [3, 8]], gpu_pool[:, :, [3, 8]])
    assert not restored[:, :, [0, 1, 2, 4, 5, 6, 7, 9]].any()


def test_decode_replayed_from_cuda_graph_matches_eager(ops: KernelOps) -> None:
    case = PagedCase([900, 31, 2000, 64], [1, 1, 1, 1], 8, 4, 128, 16, torch.bfloat16, seed=12)
    eager = case.run(ops)  # also compiles the kernels before capture
    out = torch.full_like(case.query, float("nan"))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ops.paged_attention(out, case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                            case.query_start_loc, 1, case.max_seq_len, case.scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # New inputs written in place are picked up by the next replay.
    case.seq_lens.copy_(torch.tensor([100, 31, 1500, 1], dtype=torch.int32))
    case.query.normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), case.run(TorchReferenceOps()).float(), atol=2e-2, rtol=2e-2)


def test_rejects_query_of_another_dtype(ops: KernelOps) -> None:
    case = PagedCase([10], [1], 2, 2, 64, 16, torch.float16, seed=13)
    out = torch.empty_like(case.query)
    with pytest.raises(ValueError, match="query"):
        ops.paged_attention(out, case.query.float(), case.key_cache, case.value_cache, case.block_tables,
                            case.seq_lens, case.query_start_loc, 1, 10, case.scale)
