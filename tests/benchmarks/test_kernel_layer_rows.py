"""The bytes each element-wise layer kernel must move, which its GB/s and its copy's size are counted from."""

from __future__ import annotations

import pytest

from benchmarks.kernel_layer_rows import KERNELS, bytes_moved
from benchmarks.model_shapes import SHAPES

# Llama 3.2 1B at a 1,024-token prompt, in bf16: hidden 2,048, MLP 8,192, 32 + 2 x 8 heads of 64.
ONE_B_AT_1024 = {
    "rms_norm": (2 * 1024 * 2048 + 2048) * 2,  # x in, out; the weight
    "add_rms_norm": (4 * 1024 * 2048 + 2048) * 2,  # x, residual in; residual, out; the weight
    "silu_and_mul": 3 * 1024 * 8192 * 2,  # gate, up in; out
    "rotary_write_kv": (2 * 1024 * 48 * 64 + 1024 * 64) * 2,  # qkv in, q k v out; cos, sin
    # bf16 in; e4m3 out and a float32 scale a row
    "quantize_fp8_per_row": 1024 * 2048 * 2 + 1024 * (2048 + 4),
    "rms_norm_fp8": (1024 * 2048 + 2048) * 2 + 1024 * (2048 + 4),  # x, the weight in
    "add_rms_norm_fp8": (3 * 1024 * 2048 + 2048) * 2 + 1024 * (2048 + 4),  # x, residual, the weight in; residual out
    "silu_and_mul_fp8": 2 * 1024 * 8192 * 2 + 1024 * (8192 + 4),  # gate, up in
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_bytes_moved_counts_each_input_and_output_once(kernel: str) -> None:
    assert bytes_moved(kernel, SHAPES["llama-3.2-1b"], 1024) == ONE_B_AT_1024[kernel]


def test_the_8b_rotary_counts_its_wider_heads() -> None:
    assert bytes_moved("rotary_write_kv", SHAPES["llama-3-8b"], 2) == (2 * 2 * 48 * 128 + 2 * 128) * 2
