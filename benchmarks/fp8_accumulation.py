"""An FP8 linear layer's product on the tensor cores with and without fast accumulation (Fp8Linear.fast_accumulation):
time and error, over the linear layers of the 1B and 8B shapes at the row counts of prompt steps, on rows the op
before has already quantized (QuantizedRows: that quantization is not timed).

    python -m benchmarks.fp8_accumulation [--rows 64,256,1024,1440,2048]

Per layer and mode: the median of 15 replays of a CUDA graph of the layer over distinct weight copies (at least 400 MB
in rotation). Two errors of the last output, relative (norm of the difference over the norm of the exact product, in
float64): "accumulation", against the exact product of the operands the tensor cores were given (the e4m3 rows and
weights times their scales: what the accumulation and the output's rounding add); "W8A8", against the product of the
unquantized rows and the layer's weight (what the layer adds in all, the rows' rounding to e4m3 included).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from benchmarks import report
from benchmarks.fp8_gemv_sweep import rotated_fp8_weights
from benchmarks.kernel_decode_products import LAYERS, SHAPES, graph_us

if TYPE_CHECKING:
    import torch

HEADERS = ["rows", "layer", "float32 us", "fast us", "fast / float32", "accumulation error float32",
           "accumulation error fast", "W8A8 error float32", "W8A8 error fast"]


class LayerResult(NamedTuple):
    """One layer's product both ways (float32 sums, then fast accumulation): us a layer and two relative errors."""

    model: str
    label: str  # "model layer OUTxIN"
    times_us: tuple[float, float]
    accumulation_error: tuple[float, float]
    w8a8_error: tuple[float, float]


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The norm of got - exact over the norm of exact (a float64 product), in float64."""
    return float((got.double() - exact).norm() / exact.norm())


def measure(rows: int) -> list[LayerResult]:
    """Each linear layer of each shape at `rows` rows, with float32 sums and with fast accumulation."""
    import torch

    from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear, QuantizedRows
    from pagedserve.kernels.ops import get_kernel_ops

    device = torch.device("cuda", torch.cuda.current_device())
    ops = get_kernel_ops(device)
    results = []
    for model, shapes in SHAPES.items():
        for layer, (out_features, in_features) in zip(LAYERS, shapes, strict=True):
            layers = [Fp8Linear(weight, scale, torch.bfloat16, ops)
                      for weight, scale in rotated_fp8_weights(out_features, in_features, device)]
            if not layers[0].quantizes(rows):
                raise SystemExit(f"{rows} rows do not reach the tensor cores' product (the GEMV takes them)")
            x = torch.randn(rows, in_features, device=device).to(torch.bfloat16)
            given = QuantizedRows(*ops.quantize_fp8_per_row(x))
            last = layers[-1]
            weight = last.weight.double() * last.weight_scale.double()[:, None]
            exact_operands = (given.values.double() * given.scales.double()) @ weight.T
            exact_rows = x.double() @ weight.T
            times_us, accumulation, w8a8 = [], [], []
            for fast in (False, True):
                for linear in layers:
                    linear.fast_accumulation = fast

                def launch_all(layers: list[Fp8Linear] = layers, given: QuantizedRows = given) -> None:
                    for linear in layers:
                        linear(given)

                times_us.append(graph_us(launch_all, len(layers)))
                got = last(given)
                accumulation.append(relative_error(got, exact_operands))
                w8a8.append(relative_error(got, exact_rows))
            results.append(LayerResult(model, f"{model} {layer} {out_features}x{in_features}",
                                       (times_us[0], times_us[1]), (accumulation[0], accumulation[1]),
                                       (w8a8[0], w8a8[1])))
            del layers, last, launch_all
            torch.cuda.empty_cache()
    return results


def table(rows: int, results: list[LayerResult]) -> list[list[object]]:
    """Each model's layers, a line each, then its sum of a layer's four products (times only)."""
    lines: list[list[object]] = []
    for model in SHAPES:
        own = [r for r in results if r.model == model]
        lines += [[rows, r.label, round(r.times_us[0], 2), round(r.times_us[1], 2),
                   round(r.times_us[1] / r.times_us[0], 3), f"{r.accumulation_error[0]:.2e}",
                   f"{r.accumulation_error[1]:.2e}", f"{r.w8a8_error[0]:.4f}", f"{r.w8a8_error[1]:.4f}"] for r in own]
        float32_us, fast_us = (sum(r.times_us[i] for r in own) for i in (0, 1))
        lines.append([rows, f"{model}, sum of a layer", round(float32_us, 2), round(fast_us, 2),
                      round(fast_us / float32_us, 3), "-", "-", "-", "-"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=report.int_list, default="64,256,1024,1440,2048", help="comma-separated row counts")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = p.parse_args()
    import torch

    metadata = report.run_metadata("fp8-accumulation", torch.cuda.get_device_name())
    lines = [line for rows in args.rows for line in table(rows, measure(rows))]
    print(report.text_table(HEADERS, lines))
    sections = [("us a layer, relative errors", report.markdown_table(HEADERS, lines))]
    report.write_outputs(report.result_stem(args.result_dir, metadata), {"metadata": metadata, "layers": lines},
                         report.markdown_report("FP8 products with and without fast accumulation", metadata, sections))


if __name__ == "__main__":
    main()
