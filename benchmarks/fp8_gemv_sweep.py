"""The one-row FP8 decode GEMV (kernels/decode_gemv.cu's decode_gemv, e4m3 weights) in several shapes of its own:
warps a CTA, output channels a warp, and weight loads a batch, over the linear layers of the 1B and 8B shapes. (Two
to sixteen rows run decode_gemv_mma on the tensor cores: benchmarks.fp8_gemv_rows.)

    python -m benchmarks.fp8_gemv_sweep [--before-kernels OLD_TREE/kernels]

Per launch: the median of 15 replays of a CUDA graph of launches over distinct weight copies (at least 400 MB in
rotation, so that no launch finds its weight in L2), queued as the server queues them (dependent launches, so each
launch's first loads overlap the end of the one before). GB/s counts the e4m3 weight and its float32 scales.
A variant is the kernel source with its two tuning constants replaced, so every variant runs the same code.
`--before-kernels` adds a column for another tree's kernel with one channel a warp, launched plainly. Each variant's
last output is checked against torch (the output is NaN-filled before each variant, so a variant that writes
nothing fails).
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import report
from benchmarks.kernel_decode_products import LAYERS, ROTATION_BYTES, SHAPES, graph_us

if TYPE_CHECKING:
    import torch

READ_CEILING_GBS = 4400.0
WARPS_LINE = "constexpr int kGemvWarps = 4;"
UNROLL_LINE = "constexpr int UNROLL = 2;"
VARIANTS = ((4, 1, 2), (4, 2, 2), (4, 1, 4), (4, 2, 4), (8, 1, 2), (8, 2, 2), (4, 2, 1), (4, 4, 1))  # W, C, U


def variant_source(text: str, warps: int, unroll: int) -> str:
    """decode_gemv.cu with WARPS warps a CTA and UNROLL loads a batch; refuses a source whose constants moved."""
    for line in (WARPS_LINE, UNROLL_LINE):
        if line not in text:
            raise ValueError(f"decode_gemv.cu no longer holds {line!r}: the sweep cannot vary it")
    return text.replace(WARPS_LINE, f"constexpr int kGemvWarps = {warps};").replace(
        UNROLL_LINE, f"constexpr int UNROLL = {unroll};")


def variant_label(warps: int, channels: int, unroll: int) -> str:
    return f"W{warps} C{channels} U{unroll}"


def rotated_fp8_weights(out_features: int, in_features: int, device: torch.device) -> list[tuple[torch.Tensor,
                                                                                                 torch.Tensor]]:
    """Distinct e4m3 weights [out, in] with their float32 scales [out], at least ROTATION_BYTES of them (4 at least),
    so that no launch over them in turn finds its weight in L2."""
    import torch

    from pagedserve.kernels.fp8 import quantize_per_row

    weights = []
    for _ in range(max(4, -(-ROTATION_BYTES // (out_features * in_features)))):
        quantized, scale = quantize_per_row(torch.randn(out_features, in_features, device=device))
        weights.append((quantized, scale.squeeze(1).contiguous()))
    return weights


def sweep(before_kernels: Path | None) -> dict[str, dict[str, float]]:
    """us per launch of each variant (and of the before tree's kernel), by "model layer"."""
    import cupy
    import torch

    from pagedserve.kernels import module_cache
    from pagedserve.kernels.decode_gemv import kernel_name
    from pagedserve.kernels.dependent_launch import COMPILE_DEFINE
    from pagedserve.kernels.fp8 import FP8_DTYPE
    from pagedserve.kernels.module_cache import CompiledKernel, ModuleCache
    from pagedserve.kernels.prepared_launch import argument_addresses
    from pagedserve.kernels.reference import TorchReferenceOps

    device = torch.device("cuda", torch.cuda.current_device())
    # The server's launchers: dependent launches where the device has them; the older tree's kernel launched plainly.
    server, plain = ModuleCache(device), ModuleCache(device, dependent_launch=False)
    text = module_cache.kernel_source("decode_gemv.cu")
    kernels: dict[str, tuple[CompiledKernel, int, int, ModuleCache]] = {}  # label -> (kernel, warps, channels, by)

    def compile_kernel(source: str, options: tuple[str, ...], channels: int) -> CompiledKernel:
        name = kernel_name(torch.bfloat16, FP8_DTYPE, 1, channels)
        raw = cupy.RawModule(code=source, options=options, name_expressions=(name,)).get_function(name)
        return CompiledKernel.of(raw)

    if before_kernels is not None:
        before_options = ("--std=c++17", f"-I{before_kernels}")
        kernels["before"] = (compile_kernel((before_kernels / "decode_gemv.cu").read_text(), before_options, 1), 4, 1,
                             plain)
    # Built as the server builds what it launches.
    options = (*module_cache.COMPILE_OPTIONS, *((COMPILE_DEFINE,) if server.dependent_launches else ()))
    for warps, channels, unroll in VARIANTS:
        kernels[variant_label(warps, channels, unroll)] = (
            compile_kernel(variant_source(text, warps, unroll), options, channels), warps, channels, server)
    results: dict[str, dict[str, float]] = {}
    for model, shapes in SHAPES.items():
        for layer, (out_features, in_features) in zip(LAYERS, shapes, strict=True):
            weights = rotated_fp8_weights(out_features, in_features, device)
            copies = len(weights)
            x = torch.randn(1, in_features, device=device).to(torch.bfloat16)
            out = torch.empty(1, out_features, device=device, dtype=torch.bfloat16)
            row: dict[str, float] = {}
            for label, (kernel, warps, channels, modules) in kernels.items():
                grid, block = (-(-out_features // (warps * channels)), 1, 1), (warps * 32, 1, 1)
                arrays = []
                for quantized, scale in weights:
                    args = (ctypes.c_uint64(x.data_ptr()), ctypes.c_int64(in_features),
                            ctypes.c_uint64(quantized.data_ptr()), ctypes.c_uint64(scale.data_ptr()),
                            ctypes.c_uint64(0), ctypes.c_uint64(out.data_ptr()), ctypes.c_int32(out_features),
                            ctypes.c_int32(in_features))
                    arrays.append((args, argument_addresses(args)))

                def launch_all(kernel: CompiledKernel = kernel, grid: tuple[int, int, int] = grid,
                               block: tuple[int, int, int] = block, modules: ModuleCache = modules,
                               arrays: list[Any] = arrays) -> None:
                    for _, params in arrays:
                        modules.launch_params(kernel, grid, block, params)

                out.fill_(float("nan"))
                row[label] = graph_us(launch_all, copies)
                expected = TorchReferenceOps().fp8_gemv(x, *weights[-1]).float()
                error = ((out.float() - expected).abs().max() / expected.abs().mean()).item()
                if not error <= 5e-2:  # NaN fails too
                    raise AssertionError(f"{label} {model} {layer}: relative error {error:.3g}")
            results[f"{model} {layer} {out_features}x{in_features}"] = row
            del weights
            torch.cuda.empty_cache()
    return results


def read_share(us: float, shape: str) -> float:
    """% of the read ceiling for the layer named shape ("model layer OUTxIN") at us per launch."""
    out_features, in_features = (int(n) for n in shape.rsplit(" ", 1)[1].split("x"))
    return 100.0 * (out_features * in_features + 4 * out_features) / (us * 1e3) / READ_CEILING_GBS


def markdown_tables(results: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    sections = []
    if results:
        labels = list(next(iter(results.values())))
        table = [[shape, *(f"{row[label]:.2f} / {read_share(row[label], shape):.0f} %" for label in labels)]
                 for shape, row in results.items()]
        for model in SHAPES:
            table.append([f"{model}, sum of a layer",
                          *(f"{sum(row[label] for shape, row in results.items() if shape.startswith(model + ' ')):.2f}"
                            for label in labels)])
        sections.append(("one row: us a launch / % of the read ceiling",
                         report.markdown_table(["layer", *labels], table)))
    return sections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before-kernels", type=Path, help="another tree's kernels/ directory, for a 'before' column")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = p.parse_args()
    import torch

    results = sweep(args.before_kernels)
    metadata = report.run_metadata("fp8-gemv-sweep", torch.cuda.get_device_name())
    sections = markdown_tables(results)
    for title, table in sections:
        print(title)
        print(table)
    stem = report.result_stem(args.result_dir, metadata)
    report.write_outputs(stem, {"metadata": metadata, "us_per_launch": {"1": results}},
                         report.markdown_report("FP8 decode GEMV sweep", metadata, sections))


if __name__ == "__main__":
    main()
