"""A step's attention is validated and built once and queued for each layer (kernels/attention_step.py): the key that
decides it (CPU), and on the GPU every layer's output against the reference over that layer's own caches and
scales, the checks that still hold for a later layer, and CUDA graphs captured beside it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedserve.kernels.attention_step import step_key
from pagedserve.kernels.fp8 import quantize
from pagedserve.kernels.ops import KernelOps, get_kernel_ops
from pagedserve.kernels.paged_decode import DecodeLaunch, PagedDecode
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import HAS_FP8_KERNELS, NEEDS_GPU
from tests.kernels.test_cuda_ops import TOLERANCE, PagedCase

NUM_LAYERS = 3


def _key_args() -> list[torch.Tensor]:
    """out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc of a small CPU batch."""
    return [torch.zeros(5, 4, 8), torch.zeros(5, 4, 8), torch.zeros(6, 2, 16, 8), torch.zeros(6, 2, 16, 8),
            torch.zeros(2, 3, dtype=torch.int32), torch.tensor([4, 9], dtype=torch.int32),
            torch.tensor([0, 1, 5], dtype=torch.int32)]


def _key(args: list[torch.Tensor], max_query_len: int = 4, max_seq_len: int = 9, scale: float = 0.5) -> object:
    out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = args
    return step_key(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                    max_seq_len, scale)


def test_the_key_ignores_only_the_caches_addresses() -> None:
    args = _key_args()
    key = _key(args)
    other_layer = [*args[:2], torch.ones(6, 2, 16, 8), torch.ones(6, 2, 16, 8), *args[4:]]
    assert _key(other_layer) == key
    for index in range(len(args)):
        for changed in (args[index].clone(), args[index][:1], args[index].to(torch.float64)):
            if index in (2, 3) and changed.shape == args[index].shape and changed.dtype == args[index].dtype:
                continue  # a cache at another address is another layer's: the same key
            assert _key([*args[:index], changed, *args[index + 1:]]) != key, (index, changed.shape, changed.dtype)
    strided = torch.zeros(5, 8, 8)[:, ::2]
    assert _key([strided, *args[1:]]) != key
    assert _key(args, max_query_len=1) != key and _key(args, max_seq_len=10) != key and _key(args, scale=1.0) != key


class LayeredCase:
    """A PagedCase with NUM_LAYERS layers of caches of its caches' shape (each its own random values; fp8: e4m3 at
    each layer's own scales), one query and one output."""

    def __init__(self, case: PagedCase, seed: int, fp8: bool = False, ignored_scales: bool = False) -> None:
        self.case = case
        gen = torch.Generator(device="cuda").manual_seed(seed)
        shape = case.key_cache.shape
        self.caches, self.scales = [], []
        for layer in range(NUM_LAYERS):
            key, value = (torch.randn(shape, device="cuda", generator=gen) for _ in range(2))
            if fp8:
                k_scale, v_scale = 0.01 * (layer + 1), 0.005 * (layer + 2)
                self.caches.append((quantize(key, k_scale), quantize(value, v_scale)))
            else:  # scales other than 1, given with caches of the model's dtype, must be ignored
                k_scale, v_scale = (2.0 + layer, 0.5) if ignored_scales else (1.0, 1.0)
                self.caches.append((key.to(case.key_cache.dtype), value.to(case.key_cache.dtype)))
            self.scales.append((k_scale, v_scale))

    def run(self, ops: KernelOps, out: torch.Tensor, layer: int) -> torch.Tensor:
        case = self.case
        (key, value), (k_scale, v_scale) = self.caches[layer], self.scales[layer]
        ops.paged_attention(out, case.query, key, value, case.block_tables, case.seq_lens, case.query_start_loc,
                            case.max_query_len, case.max_seq_len, case.scale, k_scale, v_scale)
        return out.clone()


CASES = {  # name: seq_lens, q_lens, kv heads, group, head_dim, block_size, dtype
    "decode_tma": ([1, 17, 300, 2500], [1, 1, 1, 1], 2, 4, 128, 16, torch.bfloat16),
    "decode_split": ([16384, 9000, 130], [1, 1, 1], 2, 4, 128, 16, torch.float16),
    "decode_lanes": ([5, 77, 700], [1, 1, 1], 2, 2, 8, 16, torch.float32),
    "mixed": ([33, 1000, 5, 200, 17], [1, 130, 0, 1, 17], 4, 8, 64, 32, torch.bfloat16),
    "rows_by_query": ([40, 300, 9], [40, 45, 1], 2, 4, 64, 16, torch.float32),
}


@pytest.fixture
def ops() -> KernelOps:
    """Each test's own: no step's launches from an earlier test (whose tensors a later one's may reuse the addresses
    of) can count as built."""
    return get_kernel_ops(torch.device("cuda", torch.cuda.current_device()))


def _assert_layers_match_reference(ops: KernelOps, layered: LayeredCase, dtype: torch.dtype) -> None:
    out = torch.full_like(layered.case.query, float("nan"))
    got = [layered.run(ops, out, layer) for layer in range(NUM_LAYERS)]
    reference = TorchReferenceOps()
    for layer in range(NUM_LAYERS):
        expected = layered.run(reference, torch.full_like(out, float("nan")), layer)
        torch.testing.assert_close(got[layer].float(), expected.float(), atol=TOLERANCE[dtype],
                                   rtol=TOLERANCE[dtype])
    assert not torch.equal(got[0], got[1])  # the layers' caches differ, and so do their outputs


def _count_decode_prepares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[number of PagedDecode.prepare calls from now on], kept up to date."""
    count = [0]
    prepare = PagedDecode.prepare

    def counting(self: PagedDecode, *args: Any, **kwargs: Any) -> DecodeLaunch | None:
        count[0] += 1
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(PagedDecode, "prepare", counting)
    return count


class TestLayersOfAStep:
    pytestmark = NEEDS_GPU

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_each_layer_attends_over_its_own_caches(self, ops: KernelOps, name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        seq_lens, q_lens, kv_heads, group, head_dim, block_size, dtype = CASES[name]
        case = PagedCase(seq_lens, q_lens, kv_heads, group, head_dim, block_size, dtype, seed=3)
        prepared = _count_decode_prepares(monkeypatch)
        _assert_layers_match_reference(ops, LayeredCase(case, seed=4, ignored_scales=True), dtype)
        assert prepared == [1]  # the first layer built the step's launches, the others reused them

    @pytest.mark.skipif(not HAS_FP8_KERNELS, reason="FP8 needs compute capability 8.9+")
    @pytest.mark.parametrize(("q_lens", "seq_lens"), [([1, 1, 1], [9, 400, 2000]), ([1, 60, 1], [33, 700, 5])])
    def test_each_layer_of_fp8_caches_takes_its_own_scales(self, ops: KernelOps, q_lens: list[int],
                                                           seq_lens: list[int]) -> None:
        case = PagedCase(seq_lens, q_lens, 2, 4, 128, 16, torch.bfloat16, seed=5)
        _assert_layers_match_reference(ops, LayeredCase(case, seed=6, fp8=True), torch.bfloat16)

    def test_a_later_layer_s_caches_are_still_checked(self, ops: KernelOps) -> None:
        layered = LayeredCase(PagedCase([10, 50], [1, 1], 2, 2, 64, 16, torch.float16, seed=7), seed=8)
        case, out = layered.case, torch.empty_like(layered.case.query)
        layered.run(ops, out, 0)
        key, value = layered.caches[1]
        for wrong in (value[:-1], value.float()):
            with pytest.raises(ValueError, match="value_cache"):
                ops.paged_attention(out, case.query, key, wrong, case.block_tables, case.seq_lens,
                                    case.query_start_loc, case.max_query_len, case.max_seq_len, case.scale)

    def test_a_graph_captured_after_eager_layers_keeps_its_own_buffers(self, ops: KernelOps,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """The eager layer and the capture share every argument (split contexts: a buffer of partials); the capture
        builds its own launches, so the graph still replays right once another step's launches replaced the eager
        ones and their buffer was freed."""
        layered = LayeredCase(PagedCase([16384, 9000], [1, 1], 2, 4, 128, 16, torch.bfloat16, seed=9), seed=10)
        out = torch.full_like(layered.case.query, float("nan"))
        prepared = _count_decode_prepares(monkeypatch)
        layered.run(ops, out, 0)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            layered.run(ops, out, 1)
        assert prepared == [2]  # the capture built its own launches
        layered.run(ops, out, 2)
        assert prepared == [2]  # and kept none: the eager layers still reuse theirs
        other = LayeredCase(PagedCase([8000, 20], [1, 1], 2, 4, 128, 16, torch.bfloat16, seed=11), seed=12)
        other.run(ops, torch.full_like(other.case.query, float("nan")), 0)
        torch.cuda.empty_cache()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = layered.run(TorchReferenceOps(), torch.full_like(out, float("nan")), 1)
        torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[torch.bfloat16],
                                   rtol=TOLERANCE[torch.bfloat16])
