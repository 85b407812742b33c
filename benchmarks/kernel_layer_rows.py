"""The decoder layer's element-wise kernels (kernels/layer_kernels.cu) at a prompt step's row counts, against a
device copy of the same bytes: whether a prompt's device time has anything to win there.

    python -m benchmarks.kernel_layer_rows [--shapes llama-3.2-1b,llama-3-8b] [--rows 1,1024,2048] [--repeats 50]
        [--kernels silu_and_mul,silu_and_mul_fp8]

Per kernel, model shape and rows: median us of one launch (CUDA events, L2 flushed before each run), the least bytes
it must move (each input read once, each output written once: bf16, or e4m3 and a float32 scale a row for the *_fp8
kernels and quantize_fp8_per_row, which need compute capability 8.9), the GB/s that makes, and
the time of a torch copy moving as many bytes (half read, half written) measured the same way. A kernel near its copy
reads and writes at what the device gives a launch of that size. Each output (and the caches rotary_write_kv fills)
is checked against TorchReferenceOps on the same inputs: the largest absolute difference is printed. Writes
<date>-kernel-layer-rows-<device>.{json,md}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from benchmarks import report
from benchmarks.model_shapes import SHAPES, ModelShape

KERNELS = ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary_write_kv", "quantize_fp8_per_row", "rms_norm_fp8",
           "add_rms_norm_fp8", "silu_and_mul_fp8")
ELEMENT_BYTES = 2  # bf16
FP8_BYTES, SCALE_BYTES = 1, 4  # an e4m3 element; a row's float32 scale
EPS = 1e-5
HEADERS = ("shape", "rows", "kernel", "MB moved", "us", "GB/s", "copy us", "kernel / copy", "max |diff|")


def bytes_moved(kernel: str, shape: ModelShape, rows: int) -> int:
    """The least bytes a launch over `rows` rows reads and writes: every input once, every output once. The
    quantizing kernels write e4m3 and a scale a row; quantize_fp8_per_row's rows are the attention output's
    (hidden_size wide, as o_proj reads them)."""
    hidden, head_dim, intermediate = shape.hidden_size, shape.resolved_head_dim, shape.intermediate_size
    qkv_width = (shape.num_heads + 2 * shape.num_kv_heads) * head_dim
    # (elements in the model dtype, width of the e4m3 rows written (0: none))
    moved = {
        "rms_norm": (2 * rows * hidden + hidden, 0),  # x in, out, weight
        "add_rms_norm": (4 * rows * hidden + hidden, 0),  # x and residual in, residual and out, weight
        "silu_and_mul": (3 * rows * intermediate, 0),  # gate and up in, out
        # qkv in; q, k and v out (as wide as qkv); cos and sin in (head_dim / 2 each)
        "rotary_write_kv": (2 * rows * qkv_width + rows * head_dim, 0),
        "quantize_fp8_per_row": (rows * hidden, hidden),
        "rms_norm_fp8": (rows * hidden + hidden, hidden),
        "add_rms_norm_fp8": (3 * rows * hidden + hidden, hidden),  # x and residual in, residual out, weight
        "silu_and_mul_fp8": (2 * rows * intermediate, intermediate),
    }
    elements, quantized_width = moved[kernel]
    fp8_bytes = rows * (quantized_width * FP8_BYTES + SCALE_BYTES) if quantized_width else 0
    return elements * ELEMENT_BYTES + fp8_bytes


@dataclass(frozen=True)
class Case:
    run: Callable[[], Any]  # the kernel's launch
    check: Callable[[], float]  # the largest |kernel - TorchReferenceOps| over what a launch writes


def _max_difference(*pairs: tuple[Any, Any]) -> float:
    return max(float((ours.float() - expected.float()).abs().max()) for ours, expected in pairs)


def _output_pairs(ours: Any, expected: Any) -> list[tuple[Any, Any]]:
    """(ours, expected) for each tensor a kernel returns: one, or a quantizing kernel's e4m3 rows and scales."""
    return list(zip(ours, expected, strict=True)) if isinstance(ours, tuple) else [(ours, expected)]


def cases(shape: ModelShape, rows: int) -> dict[str, Case]:
    import torch

    from pagedserve.kernels.layer_kernels import LayerKernels
    from pagedserve.kernels.module_cache import ModuleCache
    from pagedserve.kernels.reference import TorchReferenceOps

    device = torch.device("cuda", torch.cuda.current_device())
    kernels = LayerKernels(ModuleCache(device), torch.cuda.get_device_properties(device).multi_processor_count)
    reference = TorchReferenceOps()
    gen = torch.Generator(device=device).manual_seed(rows)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16)

    head_dim, block_size = shape.resolved_head_dim, 16
    x, residual, weight = randn(rows, shape.hidden_size), randn(rows, shape.hidden_size), randn(shape.hidden_size)
    gate_up = randn(rows, 2 * shape.intermediate_size)
    qkv = randn(rows, (shape.num_heads + 2 * shape.num_kv_heads) * head_dim)
    cos, sin = randn(rows, head_dim // 2), randn(rows, head_dim // 2)
    cache_shape = (-(-rows // block_size), shape.num_kv_heads, block_size, head_dim)
    caches = [torch.zeros(cache_shape, device=device, dtype=torch.bfloat16) for _ in range(4)]
    slots = torch.randperm(cache_shape[0] * block_size, generator=gen, device=device)[:rows]
    heads = (shape.num_heads, shape.num_kv_heads)

    def check_in_place(name: str) -> float:  # add_rms_norm(_fp8) writes residual: each on a fresh copy
        ours_residual, expected_residual = residual.clone(), residual.clone()
        ours = getattr(kernels, name)(x, ours_residual, weight, EPS)
        expected = getattr(reference, name)(x, expected_residual, weight, EPS)
        return _max_difference(*_output_pairs(ours, expected), (ours_residual, expected_residual))

    def check(name: str, *args: Any) -> float:
        return _max_difference(*_output_pairs(getattr(kernels, name)(*args), getattr(reference, name)(*args)))

    def check_rotary() -> float:
        return _max_difference((kernels.rotary_write_kv(qkv, cos, sin, caches[0], caches[1], slots, *heads),
                                reference.rotary_write_kv(qkv, cos, sin, caches[2], caches[3], slots, *heads)),
                               (caches[0], caches[2]), (caches[1], caches[3]))

    def plain(name: str, *args: Any) -> Case:
        return Case(partial(getattr(kernels, name), *args), partial(check, name, *args))

    def in_place(name: str) -> Case:  # each timed run adds x into residual again, the same work
        return Case(partial(getattr(kernels, name), x, residual, weight, EPS), partial(check_in_place, name))

    return {
        "rms_norm": plain("rms_norm", x, weight, EPS),
        "add_rms_norm": in_place("add_rms_norm"),
        "silu_and_mul": plain("silu_and_mul", gate_up),
        "rotary_write_kv": Case(lambda: kernels.rotary_write_kv(qkv, cos, sin, caches[0], caches[1], slots, *heads),
                                check_rotary),
        "quantize_fp8_per_row": plain("quantize_fp8_per_row", x),
        "rms_norm_fp8": plain("rms_norm_fp8", x, weight, EPS),
        "add_rms_norm_fp8": in_place("add_rms_norm_fp8"),
        "silu_and_mul_fp8": plain("silu_and_mul_fp8", gate_up),
    }


def _ignoring_index(run: Callable[[], Any]) -> Callable[[int], Any]:
    """run as Timer calls it (with the run's index, which these launches do not use)."""
    return lambda _: run()


def sweep(shape_names: Sequence[str], row_counts: Sequence[int], kernel_names: Sequence[str],
          repeats: int) -> list[list[object]]:
    import torch

    from benchmarks.kernel_attention import Timer

    timer = Timer(repeats)
    rows_out: list[list[object]] = []
    for name in shape_names:
        shape = SHAPES[name]
        for rows in row_counts:
            shape_cases = cases(shape, rows)
            for kernel in kernel_names:
                case = shape_cases[kernel]
                moved = bytes_moved(kernel, shape, rows)
                us = timer.median_us(_ignoring_index(case.run))
                source = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
                copy_us = timer.median_us(_ignoring_index(partial(torch.empty_like(source).copy_, source)))
                rows_out.append([name, rows, kernel, round(moved / 1e6, 2), round(us, 2), round(moved / us / 1e3),
                                 round(copy_us, 2), round(us / copy_us, 3), case.check()])
                print("  ".join(str(v) for v in rows_out[-1]), flush=True)
    return rows_out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = report.launch_table_parser(__doc__ or "", sorted(SHAPES), repeats=50)
    parser.add_argument("--rows", default="1,1024,2048", help="comma-separated row counts")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of: {', '.join(KERNELS)}")
    args = parser.parse_args(argv)
    shape_names = report.listed_names(parser, "--shapes", args.shapes, sorted(SHAPES))
    kernel_names = report.listed_names(parser, "--kernels", args.kernels, KERNELS)
    row_counts = [int(rows) for rows in args.rows.split(",")]
    print("  ".join(HEADERS))
    rows = sweep(shape_names, row_counts, kernel_names, args.repeats)
    title = "Element-wise layer kernels against a copy of the same bytes"
    return report.write_launch_table(args.result_dir, "kernel-layer-rows", title, HEADERS, rows, args.repeats)


if __name__ == "__main__":
    main()
