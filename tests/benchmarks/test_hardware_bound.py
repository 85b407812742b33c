"""Roofline bounds of decode and prefill steps and of whole workloads, on a shape small enough to count by hand."""

from __future__ import annotations

import pytest
import torch

from benchmarks.hardware_bound import (
    HardwareRates,
    Workload,
    decode_cost,
    dtype_bytes,
    measure_hardware,
    percent_of_bound,
    prefill_cost,
    workload_bound_s,
)
from benchmarks.model_shapes import ModelShape
from tests.gpu_marks import NEEDS_FP8_GPU

# 1 layer, hidden 4, 2 heads of 2, 1 KV head, MLP 8, vocab 10, untied:
# layer = 4*(2+2*1)*2 (qkv) + 4*4 (o) + 3*4*8 (mlp) + 2*4 (norms) = 32 + 16 + 96 + 8 = 152 weights.
SHAPE = ModelShape("hand", hidden_size=4, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=8,
                   vocab_size=10, tie_word_embeddings=False)
BF16 = dtype_bytes("bfloat16")
RATES = HardwareRates("test", memory_bandwidth_bytes_per_s=100.0, matmul_flops_per_s=1000.0,
                      fp8_matmul_flops_per_s=2000.0)


def test_layer_and_matmul_weights_are_counted_by_hand() -> None:
    assert SHAPE.layer_parameters == 152
    assert SHAPE.matmul_parameters == 152 + 40
    assert SHAPE.kv_bytes_per_token(2) == 2 * 1 * 1 * 2 * 2


def test_decode_step_reads_weights_and_every_sequences_kv() -> None:
    cost = decode_cost(SHAPE, widths=BF16, num_seqs=3, context_len=5)
    assert cost.bytes_moved == 192 * 2 + 3 * 5 * 8
    assert cost.flops == 2 * 192 * 3 + 4 * 1 * 2 * 2 * 5 * 3
    assert cost.time_s(RATES) == pytest.approx(max(cost.bytes_moved / 100.0, cost.flops / 1000.0))


def test_prefill_reads_weights_once_per_chunk_and_pays_causal_attention() -> None:
    cost = prefill_cost(SHAPE, widths=BF16, num_seqs=2, prompt_len=3, max_batched=4)
    assert cost.bytes_moved == 2 * 192 * 2 + 6 * 8
    assert cost.flops == 2 * 144 * 6 + 2 * (2 * 1 * 2 * 2 * 3 * 4) + 2 * 10 * 4 * 2


def test_workload_is_its_waves_of_prefill_and_decode_steps() -> None:
    workload = Workload(num_requests=3, input_len=3, output_len=3, concurrency=2, max_num_batched_tokens=4)

    def wave(n: int) -> float:
        steps = [prefill_cost(SHAPE, BF16, n, 3, 4)] + [decode_cost(SHAPE, BF16, n, 3 + k) for k in (1, 2)]
        return sum(step.time_s(RATES) for step in steps)

    assert workload_bound_s(SHAPE, BF16, RATES, workload) == pytest.approx(wave(2) + wave(1))


def test_fp8_weights_make_the_layer_linears_one_byte_and_keep_norms_and_lm_head() -> None:
    # 144 linear weights at 1 byte, 8 norm weights and the 40-weight LM head at 2.
    widths = dtype_bytes("bfloat16", fp8_weights=True)
    assert widths.matmul_weight_bytes(SHAPE) == 144 + 8 * 2 + 40 * 2
    assert decode_cost(SHAPE, widths, num_seqs=3, context_len=5).bytes_moved == 240 + 3 * 5 * 8


def test_an_fp8_lm_head_counts_one_byte_an_element_too() -> None:
    widths = dtype_bytes("bfloat16", fp8_weights=True, fp8_lm_head=True)
    assert widths.matmul_weight_bytes(SHAPE) == 144 + 8 * 2 + 40


def test_fp8_weights_count_the_layer_linears_flops_at_the_fp8_rate_and_attention_at_the_model_dtypes() -> None:
    cost = prefill_cost(SHAPE, dtype_bytes("bfloat16", fp8_weights=True), num_seqs=2, prompt_len=3, max_batched=4)

    assert cost.fp8_flops == 2 * 144 * 6
    assert cost.flops == 2 * (2 * 1 * 2 * 2 * 3 * 4) + 2 * 10 * 4 * 2
    compute_s = cost.flops / 1000.0 + cost.fp8_flops / 2000.0
    assert cost.time_s(RATES) == pytest.approx(max(cost.bytes_moved / 100.0, compute_s))


def test_an_fp8_lm_head_moves_its_flops_to_the_fp8_rate_too() -> None:
    widths = dtype_bytes("bfloat16", fp8_weights=True, fp8_lm_head=True)
    prefill = prefill_cost(SHAPE, widths, num_seqs=2, prompt_len=3, max_batched=4)
    decode = decode_cost(SHAPE, widths, num_seqs=3, context_len=5)

    assert (prefill.flops, prefill.fp8_flops) == (2 * (2 * 1 * 2 * 2 * 3 * 4), 2 * 144 * 6 + 2 * 10 * 4 * 2)
    assert (decode.flops, decode.fp8_flops) == (4 * 1 * 2 * 2 * 5 * 3, 2 * 192 * 3)


def test_model_dtype_weights_have_no_fp8_flops() -> None:
    assert prefill_cost(SHAPE, BF16, num_seqs=2, prompt_len=3, max_batched=4).fp8_flops == 0
    assert decode_cost(SHAPE, dtype_bytes("bfloat16", fp8_kv=True), num_seqs=3, context_len=5).fp8_flops == 0


def test_fp8_kv_cache_halves_the_kv_bytes_read_and_written() -> None:
    widths = dtype_bytes("bfloat16", fp8_kv=True)
    assert decode_cost(SHAPE, widths, num_seqs=3, context_len=5).bytes_moved == 192 * 2 + 3 * 5 * 4
    assert prefill_cost(SHAPE, widths, num_seqs=2, prompt_len=3, max_batched=4).bytes_moved == 2 * 192 * 2 + 6 * 4


def test_fp8_weights_and_kv_together_count_one_byte_for_both() -> None:
    both = dtype_bytes("float16", fp8_weights=True, fp8_kv=True)
    assert decode_cost(SHAPE, both, num_seqs=3, context_len=5).bytes_moved == 240 + 3 * 5 * 4


def test_percent_of_bound_is_bound_time_over_measured_time() -> None:
    assert percent_of_bound(measured_s=4.0, bound_s=1.0) == 25.0


def test_a_tensor_parallel_group_of_n_devices_is_bounded_by_n_times_their_rates() -> None:
    pair = RATES.times(2)

    assert (pair.device_name, pair.memory_bandwidth_bytes_per_s, pair.matmul_flops_per_s,
            pair.fp8_matmul_flops_per_s) == ("test x2", 200.0, 2000.0, 4000.0)
    assert RATES.times(1) is RATES


def test_a_device_without_fp8_tensor_cores_counts_fp8_linears_at_its_one_matmul_rate() -> None:
    rates = measure_hardware(torch.device("cpu"))

    assert rates.fp8_matmul_flops_per_s == rates.matmul_flops_per_s > 0


@NEEDS_FP8_GPU[0]
@NEEDS_FP8_GPU[1]
@NEEDS_FP8_GPU[2]
def test_on_an_fp8_gpu_the_e4m3_gemm_is_timed_and_runs_faster_than_bf16() -> None:
    rates = measure_hardware(torch.device("cuda"))

    print(f"bf16 {rates.matmul_flops_per_s / 1e12:.0f} TFLOP/s, e4m3 {rates.fp8_matmul_flops_per_s / 1e12:.0f} TFLOP/s")
    assert rates.fp8_matmul_flops_per_s > 1.2 * rates.matmul_flops_per_s
