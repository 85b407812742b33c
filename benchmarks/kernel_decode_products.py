"""The products of a decode step at a few rows, each kernel against the one it could replace: the 16-bit weight GEMV
(kernels/decode_gemv.cu) against cuBLAS (F.linear) over the linear layers of the 1B and 8B shapes, and the greedy
argmax of 128,256 logits split into runs (kernels/token_masks.cu) against one CTA a row.

    python -m benchmarks.kernel_decode_products [--rows 1,2] [--argmax-rows 1,4,16,64,256]

Products: per launch, the median of 15 replays of a CUDA graph of launches over distinct weight copies (at least
400 MB in rotation, so that no launch finds its weight in L2), queued as the server queues them (the GEMV's as
dependent launches, so each one's first loads overlap the end of the one before; cuBLAS's plainly). GB/s counts the
weight. Each GEMV output is checked against cuBLAS's. Argmax: the median of 15 replays of a graph of 50 launches
over logits that stay in L2, as the LM head leaves them; its tokens are checked against torch.argmax.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import report

if TYPE_CHECKING:
    import torch

SHAPES = {"llama-3.2-1b": ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)),
          "llama-3-8b": ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))}
LAYERS = ("qkv", "o", "gate_up", "down")
ROTATION_BYTES = 400_000_000
REPLAYS = 15
ARGMAX_VOCAB = 128256
ARGMAX_LAUNCHES = 50


def graph_us(launch_all: Callable[[], None], launches: int) -> float:
    """Median us a launch over REPLAYS replays of a CUDA graph of launch_all (launches launches)."""
    import torch

    launch_all()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        launch_all()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)) * 1000 / launches)
    return sorted(times)[len(times) // 2]


def product_error(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """How far got is from x @ weight.T computed in float64, beyond two units in the last place of got's dtype (what
    float32 accumulation and one rounding allow), relative to the product's mean magnitude. A comparison with cuBLAS's
    own rounded product instead fails where the two round a large output to neighbouring values."""
    import torch

    exact = x.double() @ weight.double().T
    excess = (got.double() - exact).abs() - 2 * torch.finfo(got.dtype).eps * exact.abs()
    return float(excess.max().clamp(min=0.0) / exact.abs().mean())


def products(rows: int) -> list[list[object]]:
    """[layer, cuBLAS us, GEMV us, cuBLAS GB/s, GEMV GB/s, GEMV / cuBLAS] per linear layer of each shape."""
    import torch
    import torch.nn.functional as F

    from pagedserve.kernels.decode_gemv import DecodeGemv
    from pagedserve.kernels.module_cache import ModuleCache

    device = torch.device("cuda", torch.cuda.current_device())
    gemv = DecodeGemv(ModuleCache(device))
    table: list[list[object]] = []
    for model, shapes in SHAPES.items():
        for layer, (out_features, in_features) in zip(LAYERS, shapes, strict=True):
            weight_bytes = 2 * out_features * in_features
            copies = max(4, -(-ROTATION_BYTES // weight_bytes))
            weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) / 64
                       for _ in range(copies)]
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)

            def cublas(weights: list[torch.Tensor] = weights, x: torch.Tensor = x) -> None:
                for weight in weights:
                    F.linear(x, weight)

            def ours(weights: list[torch.Tensor] = weights, x: torch.Tensor = x) -> None:
                for weight in weights:
                    gemv.gemv(x, weight)

            cublas_us, gemv_us = graph_us(cublas, copies), graph_us(ours, copies)
            error = product_error(gemv.gemv(x, weights[-1]), x, weights[-1])
            if not error <= 1e-3:  # NaN fails too
                raise AssertionError(f"{model} {layer} rows {rows}: {error:.3g} of the mean magnitude beyond two "
                                     f"units in the last place of the exact product")
            table.append([f"{model} {layer} {out_features}x{in_features}", round(cublas_us, 2), round(gemv_us, 2),
                          round(weight_bytes / cublas_us / 1e3), round(weight_bytes / gemv_us / 1e3),
                          round(gemv_us / cublas_us, 3)])
            del weights
            torch.cuda.empty_cache()
    return table


def argmax(rows: int) -> list[object]:
    """[rows, one CTA a row us, split us, split / one] of a greedy argmax of bf16 logits."""
    import torch

    from pagedserve.kernels import token_masks
    from pagedserve.kernels.module_cache import ModuleCache
    from pagedserve.kernels.token_masks import TokenMaskKernels

    kernels = TokenMaskKernels(ModuleCache(torch.device("cuda", torch.cuda.current_device())))
    logits = torch.randn(rows, ARGMAX_VOCAB, device="cuda", dtype=torch.bfloat16)

    def launch_all() -> None:
        for _ in range(ARGMAX_LAUNCHES):
            kernels.masked_argmax(logits, None)

    split_us = graph_us(launch_all, ARGMAX_LAUNCHES)
    assert kernels.masked_argmax(logits, None).tolist() == logits.argmax(dim=-1).tolist()
    chosen = token_masks.argmax_splits
    token_masks.argmax_splits = lambda num_rows, vocab_size, vec: 1
    try:
        one_us = graph_us(launch_all, ARGMAX_LAUNCHES)
        assert kernels.masked_argmax(logits, None).tolist() == logits.argmax(dim=-1).tolist()
    finally:
        token_masks.argmax_splits = chosen
    return [rows, chosen(rows, ARGMAX_VOCAB, 8), round(one_us, 2), round(split_us, 2), round(split_us / one_us, 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2", help="comma-separated row counts of the products")
    p.add_argument("--argmax-rows", default="1,4,16,64,256", help="comma-separated row counts of the argmax")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = p.parse_args()
    import torch

    metadata = report.run_metadata("decode-products", torch.cuda.get_device_name())
    product_headers = ["layer", "cuBLAS us", "GEMV us", "cuBLAS GB/s", "GEMV GB/s", "GEMV / cuBLAS"]
    sections = []
    results: dict[str, object] = {"metadata": metadata}
    for rows in (int(r) for r in args.rows.split(",")):
        table = products(rows)
        results[f"products_{rows}_rows"] = table
        sections.append((f"16-bit products, {rows} row(s)", report.markdown_table(product_headers, table)))
        print(f"{rows} row(s)")
        print(report.text_table(product_headers, table))
    argmax_headers = ["rows", "runs a row", "one CTA a row us", "split us", "split / one"]
    argmax_table = [argmax(int(r)) for r in args.argmax_rows.split(",")]
    results["argmax"] = argmax_table
    sections.append((f"Greedy argmax of {ARGMAX_VOCAB:,} bf16 logits", report.markdown_table(argmax_headers,
                                                                                              argmax_table)))
    print(report.text_table(argmax_headers, argmax_table))
    report.write_outputs(report.result_stem(args.result_dir, metadata), results,
                         report.markdown_report("Decode products at a few rows", metadata, sections))


if __name__ == "__main__":
    main()
