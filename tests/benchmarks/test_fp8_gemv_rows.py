"""The FP8 layer rows benchmark's table lists each layer it timed, by which path, and each model's sum of a layer."""

from __future__ import annotations

import pytest

from benchmarks import fp8_gemv_rows
from benchmarks.kernel_decode_products import LAYERS, SHAPES


def test_the_table_lists_each_layer_then_each_models_layer_sum() -> None:
    results = [(f"{model} {layer} {n}x{k}", "GEMV", 1.0 + i) for model, shapes in SHAPES.items()
               for i, (layer, (n, k)) in enumerate(zip(LAYERS, shapes, strict=True))]
    lines = fp8_gemv_rows.table(4, results)
    assert [line[1] for line in lines[:len(results)]] == [shape for shape, _, _ in results]
    assert all(line[0] == 4 for line in lines)
    # 8B o 4096x4096 at 2 us: 16,793,600 bytes in 2 us is 8.4 TB/s, 190.8 % of 4.4 TB/s.
    assert lines[5][2:] == ["GEMV", 2.0, pytest.approx(190.8)]
    assert lines[len(results):] == [[4, "llama-3.2-1b, sum of a layer", "-", 10.0, "-"],
                                    [4, "llama-3-8b, sum of a layer", "-", 10.0, "-"]]


def test_the_lm_head_follows_each_models_layers_and_stays_out_of_its_sum() -> None:
    layers = fp8_gemv_rows.linear_layers(lm_head=True)
    assert [(model, layer) for model, layer, _ in layers] == [
        (model, layer) for model in SHAPES for layer in (*LAYERS, "lm_head")]
    assert ("llama-3-8b", "lm_head", (128256, 4096)) in layers
    assert len(fp8_gemv_rows.linear_layers(lm_head=False)) == len(SHAPES) * len(LAYERS)
    results = [(f"{model} {layer} {n}x{k}", "GEMV", 100.0 if layer == "lm_head" else 1.0)
               for model, layer, (n, k) in layers]
    sums = fp8_gemv_rows.table(12, results)[len(results):]
    assert [line[3] for line in sums] == [4.0, 4.0]
