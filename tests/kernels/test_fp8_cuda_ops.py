"""FP8 KV kernels against TorchReferenceOps on fresh random inputs, outputs poisoned with NaN (needs a GPU of
compute capability 8.9 or later and CuPy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

from pagedserve.kernels import paged_prefill
from pagedserve.kernels.fp8 import FP8_DTYPE, quantize
from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.paged_decode import decode_layout
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU
from tests.kernels.test_cuda_ops import PagedCase

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import CompiledKernel, ModuleCache

pytestmark = NEEDS_FP8_GPU
K_SCALE, V_SCALE = 0.0125, 0.006


def _fp8_case(seq_lens: list[int], q_lens: list[int], group_size: int, head_dim: int, dtype: torch.dtype,
              seed: int, block_size: int = 16, poison_stale_slots: bool = False) -> PagedCase:
    """poison_stale_slots: NaN (e4m3 0x7F) in every pool slot outside the contexts, as a reused pool may hold."""
    case = PagedCase(seq_lens, q_lens, 2, group_size, head_dim, block_size, dtype, seed)
    if poison_stale_slots:
        case.poison_stale_slots()
    case.key_cache = quantize(case.key_cache, K_SCALE)
    case.value_cache = quantize(case.value_cache, V_SCALE)
    return case


def _run(case: PagedCase, ops: KernelOps) -> torch.Tensor:
    out = torch.full_like(case.query, float("nan"))
    ops.paged_attention(out, case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                        case.query_start_loc, case.max_query_len, case.max_seq_len, case.scale, K_SCALE, V_SCALE)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group_size", [1, 4, 8])
@pytest.mark.parametrize(("seq_lens", "q_lens"), [([1, 37, 300, 2500], [1, 1, 1, 1]), ([40, 9, 700], [40, 1, 65])],
                         ids=["decode-split", "prefill-mixed"])
def test_fp8_attention_matches_reference(ops: KernelOps, dtype: torch.dtype, head_dim: int, group_size: int,
                                         seq_lens: list[int], q_lens: list[int]) -> None:
    case = _fp8_case(seq_lens, q_lens, group_size, head_dim, dtype, seed=head_dim + group_size)
    got, expected = _run(case, ops), _run(case, TorchReferenceOps())
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_write_kv_and_rotary_write_kv_match_reference(ops: KernelOps, dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    num_heads, num_kv_heads, head_dim, tokens = 8, 2, 128, 37
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda", generator=gen).to(dtype)
    angles = torch.rand(tokens, head_dim // 2, device="cuda", generator=gen)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(64, device="cuda", generator=gen)[:tokens]
    slots[3] = -1
    caches = {}
    for name, impl in (("kernel", ops), ("reference", TorchReferenceOps())):
        pool = torch.full((2, 4, num_kv_heads, 16, head_dim), 0x7F, dtype=torch.uint8, device="cuda")  # NaN bytes
        key_cache, value_cache = pool[0].view(FP8_DTYPE), pool[1].view(FP8_DTYPE)
        q = impl.rotary_write_kv(qkv, cos, sin, key_cache, value_cache, slots, num_heads, num_kv_heads,
                                 K_SCALE * 100, V_SCALE * 100)
        caches[name] = (q, pool.clone())
        pool.fill_(0x7F)
        key, value = qkv.view(tokens, -1, head_dim)[:, num_heads:num_heads + num_kv_heads], qkv.view(
            tokens, -1, head_dim)[:, num_heads + num_kv_heads:]
        impl.write_kv(key, value, key_cache, value_cache, slots, K_SCALE * 100, V_SCALE * 100)
        caches[name + "-write"] = (q, pool.clone())
    for kind in ("", "-write"):
        q_kernel, pool_kernel = caches["kernel" + kind]
        q_reference, pool_reference = caches["reference" + kind]
        torch.testing.assert_close(q_kernel, q_reference)
        if kind == "-write":
            # The same rounding of the same float32 quotient: equal bytes, NaN bytes left only in unwritten slots.
            assert torch.equal(pool_kernel, pool_reference)
        else:
            # Rotated keys may differ by one unit in the model dtype's last place before quantizing, so a code may
            # land on its neighbour: the same sign bit, magnitudes at most one code apart, the same unwritten slots.
            kernel_codes, reference_codes = pool_kernel.long(), pool_reference.long()
            assert torch.equal(kernel_codes >> 7, reference_codes >> 7)
            assert (kernel_codes - reference_codes).abs().max().item() <= 1
            assert torch.equal(pool_kernel == 0x7F, pool_reference == 0x7F)


def test_fp8_blocks_copy_and_swap_bit_for_bit(ops: KernelOps) -> None:
    pool = torch.randint(0, 256, (2, 2, 8, 2, 16, 128), dtype=torch.uint8, device="cuda").view(FP8_DTYPE)
    before = pool.clone()
    ops.copy_blocks(pool, torch.tensor([[0, 7], [3, 4]], device="cuda"))
    assert torch.equal(pool[:, :, 7].view(torch.uint8), before[:, :, 0].view(torch.uint8))
    swap = torch.zeros(2, 2, 4, 2, 16, 128, dtype=FP8_DTYPE, pin_memory=True)
    ops.swap_blocks(pool, swap, torch.tensor([[1, 2], [5, 0]]))
    torch.cuda.synchronize()
    assert torch.equal(swap[:, :, 2].view(torch.uint8), before[:, :, 1].cpu().view(torch.uint8))
    assert torch.equal(swap[:, :, 0].view(torch.uint8), before[:, :, 5].cpu().view(torch.uint8))


def test_fp8_decode_replayed_from_a_cuda_graph_matches_eager(ops: KernelOps) -> None:
    case = _fp8_case([5, 900, 33], [1, 1, 1], 4, 128, torch.bfloat16, seed=3)
    eager = _run(case, ops)
    out = torch.full_like(case.query, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention(out, case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                            case.query_start_loc, 1, case.max_seq_len, case.scale, K_SCALE, V_SCALE)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# Full prefills and chunks over cached context: a prompt ending mid-block and mid-key-tile, one of three query
# tiles (128 rows each), a two-row chunk whose context crosses a block and a key tile (positions 127..128), a
# chunk ending exactly on a block and tile boundary, a chunk of two query tiles after a long context, a decode row.
PREFILL_SEQ_LENS, PREFILL_Q_LENS = [77, 300, 129, 64, 1000, 45], [77, 300, 2, 16, 130, 1]
# Mixed step: decodes, prefills, and an idle sequence (no query rows).
MIXED_SEQ_LENS, MIXED_Q_LENS = [33, 1000, 5, 200, 17], [1, 130, 0, 1, 17]


def _assert_poisoned_case_matches_reference(case: PagedCase, ops: KernelOps) -> None:
    assert case.key_cache.float().isnan().any() and case.value_cache.float().isnan().any()  # the poison is there
    got, expected = _run(case, ops), _run(case, TorchReferenceOps())
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group_size", [1, 4, 8])
def test_fp8_prefill_and_chunks_on_tensor_cores_match_reference(ops: KernelOps, dtype: torch.dtype, head_dim: int,
                                                                group_size: int) -> None:
    case = _fp8_case(PREFILL_SEQ_LENS, PREFILL_Q_LENS, group_size, head_dim, dtype, seed=head_dim * group_size,
                     poison_stale_slots=True)
    _assert_poisoned_case_matches_reference(case, ops)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [1, 8, 32, 128])
def test_fp8_mixed_step_over_each_block_size_matches_reference(ops: KernelOps, head_dim: int,
                                                               block_size: int) -> None:
    case = _fp8_case(MIXED_SEQ_LENS, MIXED_Q_LENS, 4, head_dim, torch.bfloat16, seed=block_size, block_size=block_size,
                     poison_stale_slots=True)
    _assert_poisoned_case_matches_reference(case, ops)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 80, 96])
def test_fp8_prefill_of_other_head_sizes_matches_reference(ops: KernelOps, dtype: torch.dtype,
                                                           head_dim: int) -> None:
    case = _fp8_case(PREFILL_SEQ_LENS, PREFILL_Q_LENS, 2, head_dim, dtype, seed=head_dim, poison_stale_slots=True)
    _assert_poisoned_case_matches_reference(case, ops)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", paged_prefill.KNOWN_HEAD_DIMS)  # 80 and 96: tiles' copies split unevenly
@pytest.mark.parametrize("tiles_of", [paged_prefill.wide_tiles, paged_prefill.narrow_tiles], ids=["wide", "narrow"])
def test_fp8_prefill_in_each_tile_shape_of_the_launcher_matches_reference(
    dtype: torch.dtype, head_dim: int, tiles_of: Callable[[int], paged_prefill.PrefillTiles],
) -> None:
    tiles = tiles_of(head_dim)
    case = _fp8_case(PREFILL_SEQ_LENS, PREFILL_Q_LENS, 4, head_dim, dtype, seed=head_dim, poison_stale_slots=True)
    rows = case.prompt_rows()
    got, expected = case.run_prefill(tiles, K_SCALE, V_SCALE)[rows], _run(case, TorchReferenceOps())[rows]
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.fixture
def kernel_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every kernel the launchers fetch (once per launch) while the test runs."""
    from pagedserve.kernels.module_cache import ModuleCache  # imports CuPy, which only GPU hosts have

    names: list[str] = []
    fetch = ModuleCache.kernel

    def recording_fetch(self: ModuleCache, source: str, name_expression: str,
                        dynamic_shared_bytes: int = 0) -> CompiledKernel:
        names.append(name_expression)
        return fetch(self, source, name_expression, dynamic_shared_bytes)

    monkeypatch.setattr(ModuleCache, "kernel", recording_fetch)
    return names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_multi_row_batches_run_the_tensor_core_prefill(ops: KernelOps, kernel_names: list[str],
                                                           dtype: torch.dtype) -> None:
    # The first prefill of a dtype loads both of the launcher's tile shapes; a step after it fetches one.
    _run(_fp8_case(PREFILL_SEQ_LENS, PREFILL_Q_LENS, 4, 128, dtype, seed=4), ops)
    kernel_names.clear()
    case = _fp8_case(MIXED_SEQ_LENS, MIXED_Q_LENS, 4, 128, dtype, seed=5)
    _run(case, ops)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = paged_prefill.tiles_for(128, case.query.shape[1], case.query.shape[0], num_sms)
    tensor_core = paged_prefill.kernel_name(dtype, FP8_DTYPE, 128, tiles)
    assert tensor_core.endswith(", fp8_e4m3_t>")
    # The prefill rows in one launch of it; then paged_decode for the decode rows only (and its split merge).
    assert kernel_names[0] == tensor_core
    assert not any(name.startswith("paged_prefill") for name in kernel_names[1:])


def test_fp8_head_size_without_tensor_core_prefill_falls_back_to_decode_per_row(ops: KernelOps,
                                                                                kernel_names: list[str]) -> None:
    case = _fp8_case(MIXED_SEQ_LENS, MIXED_Q_LENS, 4, 8, torch.bfloat16, seed=6, poison_stale_slots=True)
    _assert_poisoned_case_matches_reference(case, ops)
    assert kernel_names and not any(name.startswith("paged_prefill") for name in kernel_names)


# Decode rows over contexts of one token, one block, one past a block, a partial last block and tile (whole at block
# size 1), a context split over the SMs, and a long one: the tensor-core decode of FP8 (MmaState<..., fp8_e4m3_t>).
def _decode_seq_lens(block_size: int) -> list[int]:
    return [1, block_size, block_size + 1, max(3 * block_size - 5, 3), 700, 2500]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group_size", [1, 8])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_fp8_decode_on_tensor_cores_matches_reference(ops: KernelOps, kernel_names: list[str], dtype: torch.dtype,
                                                      head_dim: int, group_size: int, block_size: int) -> None:
    seq_lens = _decode_seq_lens(block_size)
    case = _fp8_case(seq_lens, [1] * len(seq_lens), group_size, head_dim, dtype, seed=head_dim + block_size,
                     block_size=block_size, poison_stale_slots=True)
    _assert_poisoned_case_matches_reference(case, ops)
    layout = decode_layout(dtype, head_dim, group_size, block_size, cache_dtype=FP8_DTYPE)
    assert layout.uses_mma and layout.is_fp8_cache
    assert any(name.startswith("paged_decode<MmaState<") and ", fp8_e4m3_t>" in name for name in kernel_names)
    assert any(name.startswith("paged_decode_reduce<") for name in kernel_names)  # the long context was split


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_fp8_decode_staged_by_cp_async_matches_reference(dtype: torch.dtype, head_dim: int, block_size: int) -> None:
    # The FP8 tensor-core decode with swizzled cp.async stages (as on sm_89) where sm_90 uses the bulk copies.
    seq_lens = _decode_seq_lens(block_size)
    case = _fp8_case(seq_lens, [1] * len(seq_lens), 4, head_dim, dtype, seed=block_size, block_size=block_size,
                     poison_stale_slots=True)
    got = case.run_decode_staged_by_cp_async(K_SCALE, V_SCALE)
    expected = _run(case, TorchReferenceOps())
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
