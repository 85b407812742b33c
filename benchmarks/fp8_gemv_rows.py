"""An FP8 linear layer (gpu_worker/models/fp8_linear.py, e4m3 weights) at a few rows, as the model runs it: the
decode GEMV (W8A16) up to decode_gemv.GEMV_MAX_ROWS rows, beyond them torch._scaled_mm on rows the op before has
already quantized (QuantizedRows: that quantization is not timed), over the linear layers of the 1B and 8B shapes,
and with --lm-head their LM heads too (as `--quantize-lm-head` serves them; not counted in a layer's sum). Run it in
two trees (their directories first on PYTHONPATH) to compare their kernels and their choice of path.

    python -m benchmarks.fp8_gemv_rows [--rows 1,2,4,8,12,16] [--lm-head]

Per layer: the median of 15 replays of a CUDA graph of the layer over distinct weight copies (at least 400 MB in
rotation, so that none is found in L2), dependent launches where the device has them. Each last output is checked
against the exact product of x and the e4m3 weight times its scales, in float64 (relative error of the max over the
mean magnitude: <= 5e-2 through the GEMV, <= 0.25 through _scaled_mm, whose rows are rounded to e4m3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report
from benchmarks.fp8_gemv_sweep import read_share, rotated_fp8_weights
from benchmarks.kernel_decode_products import ARGMAX_VOCAB, LAYERS, SHAPES, graph_us

HEADERS = ["rows", "layer", "path", "us", "% of read ceiling"]
TOLERANCE = {"GEMV": 5e-2, "scaled_mm": 0.25}


def linear_layers(lm_head: bool) -> list[tuple[str, str, tuple[int, int]]]:
    """(model, layer, (out, in)) of each shape's decoder layer, then its LM head (vocabulary x hidden) if asked."""
    layers = []
    for model, shapes in SHAPES.items():
        layers += [(model, layer, shape) for layer, shape in zip(LAYERS, shapes, strict=True)]
        if lm_head:
            layers.append((model, "lm_head", (ARGMAX_VOCAB, shapes[1][1])))
    return layers


def timings(rows: int, lm_head: bool) -> list[tuple[str, str, float]]:
    """("model layer OUTxIN", path, us a layer) per linear layer of each shape at `rows` rows."""
    import torch

    from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear, QuantizedRows
    from pagedserve.kernels.ops import get_kernel_ops

    device = torch.device("cuda", torch.cuda.current_device())
    ops = get_kernel_ops(device)
    results = []
    for model, layer, (out_features, in_features) in linear_layers(lm_head):
        layers = [Fp8Linear(weight, scale, torch.bfloat16, ops)
                  for weight, scale in rotated_fp8_weights(out_features, in_features, device)]
        x = torch.randn(rows, in_features, device=device).to(torch.bfloat16)
        path = "scaled_mm" if layers[0].quantizes(rows) else "GEMV"
        given = QuantizedRows(*ops.quantize_fp8_per_row(x)) if path == "scaled_mm" else x

        def launch_all(layers: list[Fp8Linear] = layers, given: torch.Tensor | QuantizedRows = given) -> None:
            for linear in layers:
                linear(given)

        us = graph_us(launch_all, len(layers))
        got = layers[-1](given).double()
        last = layers[-1]
        expected = x.double() @ (last.weight.double() * last.weight_scale.double()[:, None]).T
        error = ((got - expected).abs().max() / expected.abs().mean()).item()
        if not error <= TOLERANCE[path]:  # NaN fails too
            raise AssertionError(f"{model} {layer} rows {rows} ({path}): relative error {error:.3g}")
        results.append((f"{model} {layer} {out_features}x{in_features}", path, us))
        del layers, last, launch_all
        torch.cuda.empty_cache()
    return results


def table(rows: int, results: list[tuple[str, str, float]]) -> list[list[object]]:
    """A row per layer (path, us, % of the read ceiling), then each model's sum of a layer's products."""
    lines: list[list[object]] = [[rows, shape, path, round(us, 2), round(read_share(us, shape), 1)]
                                 for shape, path, us in results]
    for model in SHAPES:
        lines.append([rows, f"{model}, sum of a layer", "-",
                      round(sum(us for shape, _, us in results
                                if shape.startswith(model + " ") and " lm_head " not in shape), 2), "-"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=report.int_list, default="1,2,4,8,12,16", help="comma-separated row counts")
    p.add_argument("--lm-head", action="store_true", help="time each shape's LM head too")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = p.parse_args()
    import torch

    metadata = report.run_metadata("fp8-gemv-rows", torch.cuda.get_device_name())
    lines = [line for rows in args.rows for line in table(rows, timings(rows, args.lm_head))]
    print(report.text_table(HEADERS, lines))
    report.write_outputs(report.result_stem(args.result_dir, metadata), {"metadata": metadata, "layers": lines},
                         report.markdown_report("FP8 linear layers at a few rows", metadata,
                                                [("us a layer", report.markdown_table(HEADERS, lines))]))


if __name__ == "__main__":
    main()
