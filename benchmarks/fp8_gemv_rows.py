"""The FP8 decode GEMV (e4m3 weights, W8A16) as the server launches it, DecodeGemv.fp8_gemv, at a few rows over the
linear layers of the 1B and 8B shapes. Run it in two trees (their directories first on PYTHONPATH) to compare their
kernels.

    python -m benchmarks.fp8_gemv_rows [--rows 1,2,4,8]

Per launch: the median of 15 replays of a CUDA graph of dependent launches over distinct weight copies (at least
400 MB in rotation, so that no launch finds its weight in L2). Each last output is checked against the torch
reference (relative error of the max over the mean magnitude <= 5e-2; the output is written anew each launch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report
from benchmarks.fp8_gemv_sweep import read_share, rotated_fp8_weights
from benchmarks.kernel_decode_products import LAYERS, SHAPES, graph_us

HEADERS = ["rows", "layer", "us", "% of read ceiling"]


def timings(rows: int) -> list[tuple[str, float]]:
    """("model layer OUTxIN", us a launch) per linear layer of each shape at `rows` rows."""
    import torch

    from pagedserve.kernels.decode_gemv import DecodeGemv
    from pagedserve.kernels.module_cache import ModuleCache
    from pagedserve.kernels.reference import TorchReferenceOps

    device = torch.device("cuda", torch.cuda.current_device())
    gemv = DecodeGemv(ModuleCache(device))
    results = []
    for model, shapes in SHAPES.items():
        for layer, (out_features, in_features) in zip(LAYERS, shapes, strict=True):
            weights = rotated_fp8_weights(out_features, in_features, device)
            x = torch.randn(rows, in_features, device=device).to(torch.bfloat16)

            def launch_all(weights: list[tuple[torch.Tensor, torch.Tensor]] = weights, x: torch.Tensor = x) -> None:
                for quantized, scale in weights:
                    gemv.fp8_gemv(x, quantized, scale)

            us = graph_us(launch_all, len(weights))
            got = gemv.fp8_gemv(x, *weights[-1]).float()
            expected = TorchReferenceOps().fp8_gemv(x, *weights[-1]).float()
            error = ((got - expected).abs().max() / expected.abs().mean()).item()
            if not error <= 5e-2:  # NaN fails too
                raise AssertionError(f"{model} {layer} rows {rows}: relative error {error:.3g}")
            results.append((f"{model} {layer} {out_features}x{in_features}", us))
            del weights
            torch.cuda.empty_cache()
    return results


def table(rows: int, results: list[tuple[str, float]]) -> list[list[object]]:
    """A row per layer (us, % of the read ceiling), then each model's sum of a layer's products."""
    lines: list[list[object]] = [[rows, shape, round(us, 2), round(read_share(us, shape), 1)] for shape, us in results]
    for model in SHAPES:
        lines.append([rows, f"{model}, sum of a layer",
                      round(sum(us for shape, us in results if shape.startswith(model + " ")), 2), "-"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8", help="comma-separated row counts")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = p.parse_args()
    import torch

    metadata = report.run_metadata("fp8-gemv-rows", torch.cuda.get_device_name())
    lines = [line for rows in (int(r) for r in args.rows.split(",")) for line in table(rows, timings(rows))]
    print(report.text_table(HEADERS, lines))
    report.write_outputs(report.result_stem(args.result_dir, metadata), {"metadata": metadata, "layers": lines},
                         report.markdown_report("FP8 decode GEMV at a few rows", metadata,
                                                [("us a launch", report.markdown_table(HEADERS, lines))]))


if __name__ == "__main__":
    main()
