"""The FP8 accumulation benchmark's table: each layer both ways, its time ratio and errors, then each model's sum."""

from __future__ import annotations

import pytest

from benchmarks import fp8_accumulation
from benchmarks.fp8_accumulation import LayerResult
from benchmarks.kernel_decode_products import LAYERS, SHAPES


def test_each_layer_then_each_models_sum_of_a_layer() -> None:
    results = [LayerResult(f"{model} {layer} {n}x{k}", (10.0, 8.0 + i), (1.5e-3, 2.25e-3), (0.02651, 0.02662))
               for model, shapes in SHAPES.items()
               for i, (layer, (n, k)) in enumerate(zip(LAYERS, shapes, strict=True))]
    lines = fp8_accumulation.table(1024, results)
    assert [line[1] for line in lines[:len(results)]] == [r.label for r in results]
    assert lines[1] == [1024, "llama-3.2-1b o 2048x2048", 10.0, 9.0, 0.9, "1.50e-03", "2.25e-03", "0.0265", "0.0266"]
    # Each model's four layers: 40 us with float32 sums, 8 + 9 + 10 + 11 = 38 us fast.
    assert lines[len(results):] == [[1024, "llama-3.2-1b, sum of a layer", 40.0, 38.0, 0.95, "-", "-", "-", "-"],
                                    [1024, "llama-3-8b, sum of a layer", 40.0, 38.0, 0.95, "-", "-", "-", "-"]]
    assert lines[0][4] == pytest.approx(0.8)
