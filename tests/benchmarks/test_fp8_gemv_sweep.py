"""The FP8 GEMV sweep's variants are the real kernel source with its tuning constants replaced, and its tables
report what it timed."""

from __future__ import annotations

from pathlib import Path

import pytest

import pagedserve.kernels
from benchmarks import fp8_gemv_sweep
from benchmarks.kernel_decode_products import LAYERS, SHAPES

SOURCE = Path(pagedserve.kernels.__file__).resolve().parent / "decode_gemv.cu"


def test_a_variant_is_the_kernel_source_with_its_two_constants_replaced() -> None:
    text = SOURCE.read_text()
    variant = fp8_gemv_sweep.variant_source(text, warps=8, unroll=4)
    assert "constexpr int kGemvWarps = 8;" in variant and "constexpr int UNROLL = 4;" in variant
    assert fp8_gemv_sweep.WARPS_LINE not in variant and fp8_gemv_sweep.UNROLL_LINE not in variant
    assert variant.replace("= 8;", "= 4;", 1).replace("UNROLL = 4;", "UNROLL = 2;", 1) == text


def test_a_source_whose_constants_moved_is_refused() -> None:
    text = SOURCE.read_text().replace(fp8_gemv_sweep.UNROLL_LINE, "constexpr int UNROLL = 3;")
    with pytest.raises(ValueError, match="UNROLL"):
        fp8_gemv_sweep.variant_source(text, warps=4, unroll=2)


def test_read_share_counts_the_weight_and_its_scales() -> None:
    # 4096 x 4096 e4m3 plus 4096 float32 scales is 16,793,600 bytes: 4.4 TB/s reads it in 3.8167 us.
    assert fp8_gemv_sweep.read_share(16_793_600 / 4400.0 / 1e3, "llama-3-8b o 4096x4096") == pytest.approx(100.0)


def test_tables_list_each_layer_and_each_models_layer_sum() -> None:
    results = {f"{model} {layer} {n}x{k}": {"before": 2.0, "W4 C1 U2": 1.0}
               for model, shapes in SHAPES.items()
               for layer, (n, k) in zip(LAYERS, shapes, strict=True)}
    [(title, table)] = fp8_gemv_sweep.markdown_tables(results)
    assert title.startswith("one row")
    assert "| llama-3-8b, sum of a layer | 8.00 | 4.00 |" in table
    assert "| llama-3.2-1b, sum of a layer | 8.00 | 4.00 |" in table
    assert table.count("\n") == 2 + 8 + 2
