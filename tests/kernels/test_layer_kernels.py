"""The torch reference of the layer ops against the model's formulas (CPU), and LayerKernels against it (GPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.kernels.layer_kernels import LayerKernels
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_GPU

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-6
# rms_norm sums squares in another order than torch, so 1/rms may differ in its last fp32 bits; that can move the
# normalised value, and then the weighted output, by one unit in the last place each: two ulps of the dtype.
NORM_RTOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
NORM_ATOL = 1e-6  # values this small are fp16 subnormals, whose ulp is absolute
REFERENCE = TorchReferenceOps()


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu", scale: float = 1.0) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _original_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm.forward of gpu_worker/models/layers.py, quoted."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _original_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """rotate of gpu_worker/models/rope.py, quoted: x [T, H, D], cos / sin [T, 1, D // 2]."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class RotaryCase:
    """qkv rows of num_heads q, num_kv_heads k and v heads; distinct slots, every fourth token (from the second)
    padding; caches full of NaN, so any slot written by mistake shows."""

    def __init__(self, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, seed: int, device: str = "cpu") -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = _random((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), dtype, seed, device)
        angles = _random((num_tokens, head_dim // 2), torch.float32, seed + 1, device, scale=10.0)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        num_blocks = -(-num_tokens // block_size) + 3
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        self.slot_mapping = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:num_tokens]
        self.slot_mapping[1::4] = -1
        self.key_cache = torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=dtype,
                                    device=device)
        self.value_cache = self.key_cache.clone()

    def run(self, rotary_write_kv: Callable[..., Tensor]) -> Tensor:
        return rotary_write_kv(self.qkv, self.cos, self.sin, self.key_cache, self.value_cache, self.slot_mapping,
                               self.num_heads, self.num_kv_heads)

    def heads(self) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of qkv, each [T, heads, head_dim]."""
        heads = self.qkv.view(self.qkv.shape[0], -1, self.head_dim)
        k_start, v_start = self.num_heads, self.num_heads + self.num_kv_heads
        return heads[:, :k_start], heads[:, k_start:v_start], heads[:, v_start:]


def _assert_equal(got: Tensor, expected: Tensor) -> None:
    """Bit-for-bit equal values (NaN where expected has NaN), same dtype and shape."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


# -- the torch reference: the model's formulas (CPU) -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_is_the_model_rmsnorm(dtype: torch.dtype) -> None:
    x, weight = _random((5, 64), dtype, seed=1), _random((64,), dtype, seed=2)
    _assert_equal(REFERENCE.rms_norm(x, weight, EPS), _original_rms_norm(x, weight, EPS))


def test_rms_norm_of_a_constant_row_is_the_weight() -> None:
    x = torch.full((2, 16), -4.0, dtype=torch.bfloat16)
    weight = _random((16,), torch.bfloat16, seed=3)
    _assert_equal(REFERENCE.rms_norm(x, weight, 0.0), -weight.expand(2, 16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_reference_adds_into_residual_then_normalises(dtype: torch.dtype) -> None:
    x, residual, weight = (_random(shape, dtype, seed) for seed, shape in enumerate([(3, 32), (3, 32), (32,)]))
    expected_residual = residual + x
    out = REFERENCE.add_rms_norm(x, residual, weight, EPS)
    _assert_equal(residual, expected_residual)
    _assert_equal(out, _original_rms_norm(expected_residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_reference_is_the_model_mlp_activation(dtype: torch.dtype) -> None:
    gate_up = _random((4, 2 * 24), dtype, seed=4, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    _assert_equal(REFERENCE.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reference_is_the_model_rotation(dtype: torch.dtype) -> None:
    case = RotaryCase(6, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype, seed=5)
    q, k, _ = case.heads()
    rotated = _original_rotate(torch.cat((q, k), dim=1), case.cos[:, None, :], case.sin[:, None, :])
    got = case.run(REFERENCE.rotary_write_kv)
    assert got.is_contiguous()
    _assert_equal(got, rotated[:, : case.num_heads])


def test_rotary_by_a_quarter_turn_maps_halves_to_minus_second_and_first() -> None:
    case = RotaryCase(3, num_heads=2, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32, seed=6)
    case.cos.zero_()
    case.sin.fill_(1.0)
    q, _, _ = case.heads()
    _assert_equal(case.run(REFERENCE.rotary_write_kv), torch.cat((-q[..., 2:], q[..., :2]), dim=-1))


def test_rotary_write_kv_reference_fills_each_tokens_slot_and_skips_padding() -> None:
    # Identity rotation: k is written as is.                 token:   0   1   2   3   4
    case = RotaryCase(5, num_heads=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32, seed=7)
    case.slot_mapping = torch.tensor([9, -1, 0, 3, 4])  # slot 9 = block 2, offset 1
    case.cos.fill_(1.0)
    case.sin.zero_()
    _, k, v = case.heads()
    case.run(REFERENCE.rotary_write_kv)
    for token, slot in [(0, 9), (2, 0), (3, 3), (4, 4)]:
        _assert_equal(case.key_cache[slot // 4, :, slot % 4], k[token])
        _assert_equal(case.value_cache[slot // 4, :, slot % 4], v[token])
    written = torch.zeros(case.key_cache.shape[0] * 4, dtype=torch.bool)
    written[[9, 0, 3, 4]] = True
    is_nan = case.key_cache.isnan().all(dim=-1).all(dim=1).flatten()
    assert torch.equal(is_nan, ~written)  # every other slot, token 1's included, is untouched
    assert torch.equal(case.value_cache.isnan().all(dim=-1).all(dim=1).flatten(), ~written)


# -- LayerKernels against the torch reference (GPU) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def kernels() -> LayerKernels:
    from pagedserve.kernels.module_cache import ModuleCache

    device = torch.device("cuda", torch.cuda.current_device())
    return LayerKernels(ModuleCache(device), torch.cuda.get_device_properties(device).multi_processor_count)


def _assert_norm_close(got: Tensor, expected: Tensor) -> None:
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=NORM_RTOL[got.dtype], atol=NORM_ATOL)


@pytest.mark.usefixtures("poisoned_outputs")
class TestKernelsMatchReference:
    pytestmark = NEEDS_GPU

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [8, 13, 64, 2048, 4096, 5120])
    @pytest.mark.parametrize("num_tokens", [1, 3, 517])
    def test_rms_norm(self, kernels: LayerKernels, dtype: torch.dtype, hidden: int, num_tokens: int) -> None:
        x = _random((num_tokens, hidden), dtype, seed=hidden + num_tokens, device="cuda")
        weight = (1 + _random((hidden,), torch.float32, seed=8, device="cuda", scale=0.1)).to(dtype)
        _assert_norm_close(kernels.rms_norm(x, weight, EPS), REFERENCE.rms_norm(x, weight, EPS))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("offset", [0, 1])  # 1: rows off the vector alignment, so one element per load
    def test_rms_norm_of_strided_rows(self, kernels: LayerKernels, dtype: torch.dtype, offset: int) -> None:
        rows = _random((37, 128 + 24), dtype, seed=9, device="cuda")
        x = rows[:, offset : offset + 128]
        weight = _random((128,), dtype, seed=10, device="cuda")
        _assert_norm_close(kernels.rms_norm(x, weight, EPS), REFERENCE.rms_norm(x, weight, EPS))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [8, 13, 2048, 5120])
    @pytest.mark.parametrize("num_tokens", [1, 3, 517])
    def test_add_rms_norm(self, kernels: LayerKernels, dtype: torch.dtype, hidden: int, num_tokens: int) -> None:
        x = _random((num_tokens, hidden), dtype, seed=11, device="cuda")
        residual = _random((num_tokens, hidden), dtype, seed=12, device="cuda", scale=8.0)
        weight = _random((hidden,), dtype, seed=13, device="cuda")
        expected_residual = residual.clone()
        expected = REFERENCE.add_rms_norm(x, expected_residual, weight, EPS)
        got = kernels.add_rms_norm(x, residual, weight, EPS)
        _assert_equal(residual, expected_residual)
        _assert_norm_close(got, expected)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("size", [8, 13, 64, 2048, 4096, 5120])
    @pytest.mark.parametrize("num_tokens", [1, 3, 517])
    def test_silu_and_mul(self, kernels: LayerKernels, dtype: torch.dtype, size: int, num_tokens: int) -> None:
        gate_up = _random((num_tokens, 2 * size), dtype, seed=size, device="cuda", scale=4.0)
        _assert_equal(kernels.silu_and_mul(gate_up), REFERENCE.silu_and_mul(gate_up))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("head_dim", [6, 8, 64, 128])  # 6: three-element halves, one element per load
    @pytest.mark.parametrize("num_tokens", [1, 3, 517])
    @pytest.mark.parametrize("block_size", [8, 16, 32])
    def test_rotary_write_kv(self, kernels: LayerKernels, dtype: torch.dtype, head_dim: int, num_tokens: int,
                             block_size: int) -> None:
        case = RotaryCase(num_tokens, 8, 2, head_dim, block_size, dtype, seed=head_dim + num_tokens, device="cuda")
        expected = RotaryCase(num_tokens, 8, 2, head_dim, block_size, dtype, seed=head_dim + num_tokens,
                              device="cuda")
        _assert_equal(case.run(kernels.rotary_write_kv), expected.run(REFERENCE.rotary_write_kv))
        _assert_equal(case.key_cache, expected.key_cache)
        _assert_equal(case.value_cache, expected.value_cache)

    def test_layer_replayed_from_a_cuda_graph_matches_reference(self, kernels: LayerKernels) -> None:
        dtype, hidden = torch.bfloat16, 256
        x = _random((7, hidden), dtype, seed=14, device="cuda")
        residual = _random((7, hidden), dtype, seed=15, device="cuda")
        weight = _random((hidden,), dtype, seed=16, device="cuda")
        case = RotaryCase(7, 4, 2, 64, 16, dtype, seed=17, device="cuda")

        def layer() -> tuple[Tensor, ...]:
            normed = kernels.add_rms_norm(x, residual, weight, EPS)
            return normed, kernels.silu_and_mul(normed), case.run(kernels.rotary_write_kv)

        layer()  # compiles every kernel before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outputs = layer()
        # New inputs written in place are picked up by the replay.
        expected_residual = residual.clone()
        x.normal_()
        case.qkv.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expected_normed = REFERENCE.add_rms_norm(x, expected_residual, weight, EPS)
        _assert_equal(residual, expected_residual)
        _assert_norm_close(outputs[0], expected_normed)
        _assert_equal(outputs[1], REFERENCE.silu_and_mul(outputs[0]))
        key_cache = case.key_cache.clone()
        _assert_equal(outputs[2], case.run(REFERENCE.rotary_write_kv))
        _assert_equal(key_cache, case.key_cache)

    def test_rejects_mismatched_arguments(self, kernels: LayerKernels) -> None:
        x = torch.ones((3, 64), dtype=torch.float16, device="cuda")
        with pytest.raises(ValueError, match="weight"):
            kernels.rms_norm(x, torch.ones(64, device="cuda"), EPS)
        with pytest.raises(ValueError, match="unit column stride"):
            kernels.rms_norm(x.t(), torch.ones(3, dtype=torch.float16, device="cuda"), EPS)
        with pytest.raises(ValueError, match="gate_up"):
            kernels.silu_and_mul(x[:, :63])
        case = RotaryCase(3, 4, 2, 8, 16, torch.float16, seed=18, device="cuda")
        case.slot_mapping = case.slot_mapping.to(torch.int32)
        with pytest.raises(ValueError, match="slot_mapping"):
            case.run(kernels.rotary_write_kv)
