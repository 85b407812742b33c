"""Tile shapes of the prompt attention (paged_prefill) against the wide shape, on the step shapes of
benchmarks.kernel_prefill_steps: each shape's time, and its output against the torch reference.

The wide shape (paged_prefill.wide_tiles) gives each of four warps two m-tiles of 16 query rows, over key tiles of
64 tokens at head size 64 and 32 at 128. That takes about 220-250 registers a thread, so an SM runs two such CTAs
(8 warps): Nsight Compute on an H100 read 12.5 % occupancy and about half the issue slots used, on the offline and
first-token shapes. One m-tile a warp needs about 126 registers at head size 64 (128 at 128), so twice the warps
fit, while each key and value fragment read from shared memory then feeds one mma instead of two. The wide shape
held to three CTAs an SM compiles to 168 registers, with some spilled. Which wins on which step is what this
measures; the launcher picks one of the wide and narrow shapes by the step's size (paged_prefill.tiles_for).

Run on a CUDA machine: python -m benchmarks.kernel_prefill_tiles [--shapes llama-3.2-1b,llama-3-8b] [--repeats 30]
Prints, per model shape, step, cache dtype (16-bit, FP8) and tile shape: median us (CUDA events, L2 flushed before
each run), TFLOP/s of the prompt rows' causal attention, time over the wide shape's, whether the launcher picks the
shape for the step, and the largest difference from TorchReferenceOps over the prompt rows; writes the same as
<date>-kernel-prefill-tiles-<device>.{json,md}. A candidate whose shared memory exceeds what the device gives a CTA
is left out; the wide shape, the baseline, must fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import report
from benchmarks.kernel_attention import SHAPES, Timer
from benchmarks.kernel_prefill_steps import STEPS, StepInputs, causal_flops, step_inputs, time_launch
from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.paged_prefill import PrefillTiles, shared_bytes, tiles_for, wide_tiles
from pagedserve.kernels.reference import TorchReferenceOps

# Tried beside the wide shape, by head size: one m-tile a warp with four or eight warps and other key tiles (the
# launcher's narrow shape among them), and the wide shape held to three CTAs an SM.
CANDIDATES: dict[int, tuple[PrefillTiles, ...]] = {
    64: (PrefillTiles(1, 64), PrefillTiles(1, 64, warps=8), PrefillTiles(1, 128), PrefillTiles(1, 32),
         PrefillTiles(2, 64, min_ctas=3)),
    128: (PrefillTiles(1, 32), PrefillTiles(1, 32, warps=8), PrefillTiles(1, 64), PrefillTiles(2, 32, min_ctas=3)),
}
STEP_NAMES = ("offline: 16 prompts of 1,024", "c=256: 254 decodes first, chunks 1,024 + 776",
              "c=64: 62 decodes first, chunks 1,024 + 960", "c=1: one prompt of 1,024",
              "c=1: chunk 1,792 at 256 of 2,048")
CACHE_DTYPES = ((torch.bfloat16, "bf16"), (FP8_DTYPE, "fp8"))
HEADERS = ("shape", "step", "cache", "m_tiles", "block_n", "warps", "min CTAs an SM", "us", "TFLOP/s",
           "time / wide", "launcher's", "max |diff| from reference")


def tile_shapes(head_dim: int, cache_dtype: torch.dtype, max_shared_bytes: int) -> list[PrefillTiles]:
    """The wide tile shape, then the candidates for head_dim whose shared memory fits max_shared_bytes."""
    wide = wide_tiles(head_dim)
    shapes = [wide] + [t for t in CANDIDATES.get(head_dim, ()) if t != wide]
    return [t for t in shapes if shared_bytes(cache_dtype, head_dim, t) <= max_shared_bytes]


def reference_output(inputs: StepInputs) -> torch.Tensor:
    """TorchReferenceOps' attention of the step (FP8 caches dequantized at scale 1, as the launches read them)."""
    out = torch.zeros_like(inputs.query)
    TorchReferenceOps().paged_attention(out, inputs.query, inputs.key_cache, inputs.value_cache, inputs.block_tables,
                                        inputs.seq_lens, inputs.query_start_loc, 0, 0, inputs.scale)
    return out


def sweep(shapes: Sequence[str], repeats: int) -> list[list[object]]:
    # Imported here so that the module imports without cupy, as on CPU-only installs.
    import cupy

    from pagedserve.kernels.module_cache import ModuleCache
    from pagedserve.kernels.paged_prefill import PagedPrefill

    device = torch.device("cuda", torch.cuda.current_device())
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    prefill = PagedPrefill(ModuleCache(device), num_sms)
    max_shared = int(cupy.cuda.runtime.getDeviceProperties(device.index)["sharedMemPerBlockOptin"])
    timer = Timer(repeats)
    rows: list[list[object]] = []
    for shape in shapes:
        q_heads, _, head_dim = SHAPES[shape]
        for step_name in STEP_NAMES:
            step = STEPS[step_name]
            flops = causal_flops(step, q_heads, head_dim)
            for cache_dtype, label in CACHE_DTYPES:
                inputs = step_inputs(shape, step, cache_dtype)
                prompt_rows = inputs.prompt_rows()
                expected = reference_output(inputs)[prompt_rows].float()
                chosen = tiles_for(head_dim, q_heads, inputs.query.shape[0], num_sms)
                candidates = tile_shapes(head_dim, cache_dtype, max_shared)
                if candidates[0] != wide_tiles(head_dim):
                    raise RuntimeError(f"the wide tile shape does not fit {max_shared} bytes of shared memory a CTA")
                wide_us = 0.0  # the first shape's time
                for tiles in candidates:
                    us, out = time_launch(timer, prefill, inputs, tiles)
                    wide_us = wide_us or us
                    diff = float((out[prompt_rows].float() - expected).abs().max())
                    rows.append([shape, step_name, label, tiles.m_tiles, tiles.block_n, tiles.warps, tiles.min_ctas,
                                 round(us, 1), round(flops / us / 1e6, 1), round(us / wide_us, 3),
                                 "yes" if tiles == chosen else "", diff])
                    print("  ".join(str(v) for v in rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = report.launch_table_parser(__doc__ or "", sorted(SHAPES), repeats=30)
    args = parser.parse_args(argv)
    rows = sweep(report.listed_names(parser, "--shapes", args.shapes, sorted(SHAPES)), args.repeats)
    title = "Prompt attention: tile shapes against the wide shape"
    return report.write_launch_table(args.result_dir, "kernel-prefill-tiles", title, HEADERS, rows, args.repeats)


if __name__ == "__main__":
    main()
