"""The FP8 (e4m3) KV path of TorchReferenceOps: quantization error, and attention equal to the same math done
explicitly in float32 on the dequantized cache (CPU)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.fp8 import FP8_DTYPE, FP8_MAX, dequantize, quantize
from pagedserve.kernels.reference import TorchReferenceOps
from tests.kernels.test_reference import _naive_attention, _random_case

SMALLEST_NORMAL = 2.0**-6
RELATIVE_STEP = 2.0**-3  # e4m3 keeps 3 mantissa bits: rounding errs by at most half a step, 2**-4 relative


def test_every_e4m3_value_survives_a_round_trip() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE)
    values = codes.float()
    finite = values[values.isfinite()]
    for scale in (1.0, 0.037):
        assert torch.equal(dequantize(quantize(finite * scale, scale), scale), (finite * scale).float())


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_quantize_rounds_to_within_half_a_step_and_saturates(scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=generator) * torch.logspace(-4, 3, 4096) * scale
    got = dequantize(quantize(x, scale), scale)
    magnitude = (x / scale).abs()
    normal = (magnitude >= SMALLEST_NORMAL) & (magnitude <= FP8_MAX)
    assert ((got - x).abs()[normal] <= x.abs()[normal] * RELATIVE_STEP / 2 + 1e-12).all()
    subnormal = magnitude < SMALLEST_NORMAL
    assert ((got - x).abs()[subnormal] <= 2.0**-10 * scale + 1e-12).all()  # subnormal spacing 2**-9
    over = magnitude > FP8_MAX
    assert over.any() and torch.equal(got[over], torch.sign(x[over]) * FP8_MAX * scale)


def _fp8_case(seq_lens: list[int], q_lens: list[int], k_scale: float, v_scale: float) -> dict[str, object]:
    """A random paged case whose caches hold quantize(original, scale) in e4m3, with originals ~ N(0, 3)."""
    case = _random_case(seq_lens, q_lens, num_kv_heads=2, group_size=4, block_size=4, head_dim=16,
                        dtype=torch.bfloat16)
    originals = {name: (case[name].float() * 3) for name in ("key_cache", "value_cache")}
    return {**case, "original_keys": originals["key_cache"], "original_values": originals["value_cache"],
            "key_cache": quantize(originals["key_cache"], k_scale),
            "value_cache": quantize(originals["value_cache"], v_scale)}


@pytest.mark.parametrize(("seq_lens", "q_lens"), [([5, 17, 9], [1, 1, 1]), ([12, 7, 20], [12, 3, 1])],
                         ids=["decode", "prefill-and-mixed"])
def test_fp8_attention_equals_float32_attention_over_the_dequantized_cache(seq_lens: list[int],
                                                                          q_lens: list[int]) -> None:
    k_scale, v_scale = 0.02, 0.05
    case = _fp8_case(seq_lens, q_lens, k_scale, v_scale)
    query = case["query"]
    assert isinstance(query, torch.Tensor)
    key_cache, value_cache, tables = case["key_cache"], case["value_cache"], case["block_tables"]
    assert isinstance(key_cache, torch.Tensor) and isinstance(value_cache, torch.Tensor)
    assert isinstance(tables, torch.Tensor)
    scale = 0.25
    out = torch.full_like(query, float("nan"))
    TorchReferenceOps().paged_attention(
        out, query, key_cache, value_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32), max(q_lens), max(seq_lens),
        scale, k_scale, v_scale,
    )
    explicit = _naive_attention(query, dequantize(key_cache, k_scale), dequantize(value_cache, v_scale), tables,
                                seq_lens, q_lens, scale)
    torch.testing.assert_close(out.float(), explicit.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    exact_kv = _naive_attention(query, case["original_keys"], case["original_values"], tables,  # type: ignore[arg-type]
                                seq_lens, q_lens, scale)
    relative_error = (out.float() - exact_kv).norm() / exact_kv.norm()
    assert relative_error < 0.05  # e4m3 keeps ~2**-4 relative precision per element


def test_write_kv_stores_scaled_e4m3_and_skips_padding() -> None:
    generator = torch.Generator().manual_seed(1)
    key, value = torch.randn(5, 2, 8, generator=generator), torch.randn(5, 2, 8, generator=generator)
    key_cache = torch.zeros(4, 2, 4, 8, dtype=FP8_DTYPE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([3, -1, 8, 15, 0])
    TorchReferenceOps().write_kv(key.bfloat16(), value.bfloat16(), key_cache, value_cache, slots, 0.1, 0.5)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        stored_k, stored_v = key_cache[slot // 4, :, slot % 4], value_cache[slot // 4, :, slot % 4]
        assert torch.equal(stored_k.view(torch.uint8), quantize(key[token].bfloat16(), 0.1).view(torch.uint8))
        assert torch.equal(stored_v.view(torch.uint8), quantize(value[token].bfloat16(), 0.5).view(torch.uint8))
    written = torch.zeros(16, dtype=torch.bool)
    written[[3, 8, 15, 0]] = True
    untouched = key_cache.view(torch.uint8).permute(0, 2, 1, 3).reshape(16, -1)[~written]
    assert not untouched.any()


def test_rotary_write_kv_quantizes_the_rotated_keys() -> None:
    generator = torch.Generator().manual_seed(2)
    num_heads, num_kv_heads, head_dim, tokens = 4, 2, 8, 3
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).bfloat16()
    angles = torch.rand(tokens, head_dim // 2, generator=generator)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    slots = torch.tensor([1, 6, -1])
    ops = TorchReferenceOps()
    plain = torch.zeros(2, num_kv_heads, 4, head_dim, dtype=torch.bfloat16), torch.zeros(2, num_kv_heads, 4, head_dim,
                                                                                       dtype=torch.bfloat16)
    fp8 = torch.zeros(*plain[0].shape, dtype=FP8_DTYPE), torch.zeros(*plain[0].shape, dtype=FP8_DTYPE)
    q_plain = ops.rotary_write_kv(qkv, cos, sin, *plain, slots, num_heads, num_kv_heads)
    q_fp8 = ops.rotary_write_kv(qkv, cos, sin, *fp8, slots, num_heads, num_kv_heads, 0.03, 0.07)
    assert torch.equal(q_plain, q_fp8)
    assert torch.equal(fp8[0].view(torch.uint8), quantize(plain[0], 0.03).view(torch.uint8))
    assert torch.equal(fp8[1].view(torch.uint8), quantize(plain[1], 0.07).view(torch.uint8))


def test_copy_and_swap_move_fp8_blocks_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(3)
    pool = torch.randint(0, 256, (2, 2, 6, 2, 4, 8), generator=generator, dtype=torch.uint8).view(FP8_DTYPE)
    before = pool.clone()
    ops = TorchReferenceOps()
    ops.copy_blocks(pool, torch.tensor([[0, 5], [2, 3]]))
    assert torch.equal(pool[:, :, 5].view(torch.uint8), before[:, :, 0].view(torch.uint8))
    assert torch.equal(pool[:, :, 3].view(torch.uint8), before[:, :, 2].view(torch.uint8))
    swap = torch.zeros(2, 2, 3, 2, 4, 8, dtype=FP8_DTYPE)
    ops.swap_blocks(pool, swap, torch.tensor([[1, 2], [4, 0]]))
    pool.view(torch.uint8).zero_()
    ops.swap_blocks(swap, pool, torch.tensor([[2, 1], [0, 4]]))
    for block in (1, 4):
        assert torch.equal(pool[:, :, block].view(torch.uint8), before[:, :, block].view(torch.uint8))
