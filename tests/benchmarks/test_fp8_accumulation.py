"""The FP8 accumulation benchmark's table: each model's layers both ways, their time ratio and errors, then its sum
of a layer."""

from __future__ import annotations

from benchmarks import fp8_accumulation
from benchmarks.fp8_accumulation import LayerResult
from benchmarks.kernel_decode_products import LAYERS, SHAPES


def test_each_models_layers_then_its_sum_of_a_layer() -> None:
    results = [LayerResult(model, f"{model} {layer} {n}x{k}", (10.0, 8.0 + i), (1.5e-3, 2.25e-3), (0.02651, 0.02662))
               for model, shapes in SHAPES.items()
               for i, (layer, (n, k)) in enumerate(zip(LAYERS, shapes, strict=True))]
    lines = fp8_accumulation.table(1024, results)
    per_model = len(LAYERS) + 1
    assert [line[1] for line in lines] == [label for model in SHAPES for label in (
        *(r.label for r in results if r.model == model), f"{model}, sum of a layer")]
    assert lines[0][4] == 0.8
    assert lines[1] == [1024, "llama-3.2-1b o 2048x2048", 10.0, 9.0, 0.9, "1.50e-03", "2.25e-03", "0.0265", "0.0266"]
    # Each model's four layers: 40 us with float32 sums, 8 + 9 + 10 + 11 = 38 us fast.
    for model_index in range(len(SHAPES)):
        assert lines[per_model * (model_index + 1) - 1][2:] == [40.0, 38.0, 0.95, "-", "-", "-", "-"]
