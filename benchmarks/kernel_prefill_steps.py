"""Prompt attention (paged_prefill) on the step shapes that serving and offline runs make, 16-bit and FP8 caches.

A step of a 2,048-token budget at high concurrency carries one or two prompt chunks beside a few hundred decodes,
whose rows paged_prefill skips (the mixed shapes below hold 2,046 to 2,054 tokens); an offline step of 16,384 tokens
carries 16 whole prompts. The short steps give the kernel a grid of under two waves, so how it orders its CTAs shows
there, not on the offline shape.

Run on a CUDA machine: python -m benchmarks.kernel_prefill_steps [--shape llama-3.2-1b] [--repeats 50]
Prints one line per step shape and cache dtype: median us (CUDA events, L2 flushed before each run), TFLOP/s of the
causal attention the prompt rows compute, and a checksum of the output (equal across commits that change only the
order of the work).
"""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass

import torch

from benchmarks.kernel_attention import BLOCK_SIZE, SHAPES, Timer
from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.paged_prefill import PagedPrefill, PrefillTiles, computed_rows

DECODE_CONTEXT = 1100
C256_CHUNKS = [(1024, 1024), (776, 776)]
C256_DECODES = [(1, DECODE_CONTEXT)] * 254
C64_CHUNKS = [(1024, 1024), (960, 960)]
C64_DECODES = [(1, DECODE_CONTEXT)] * 62
# name: per sequence (query rows, context length after the step), in work order. The scheduler's own order puts
# the running requests first, in admission order, and the newly admitted last: a serving step's decodes come before
# its prompt chunks (the "decodes first" shapes), whose grid slots the kernel dispatches first.
STEPS: dict[str, list[tuple[int, int]]] = {
    "offline: 16 prompts of 1,024": [(1024, 1024)] * 16,
    "c=256: chunks 1,024 + 776, 254 decodes": C256_CHUNKS + C256_DECODES,
    "c=256: 254 decodes first, chunks 1,024 + 776": C256_DECODES + C256_CHUNKS,
    "c=256: chunks 512 of 1,024 + 1,280, 254 decodes": [(512, 1024), (1280, 1280)] + C256_DECODES,
    "c=64: chunks 1,024 + 960, 62 decodes": C64_CHUNKS + C64_DECODES,
    "c=64: 62 decodes first, chunks 1,024 + 960": C64_DECODES + C64_CHUNKS,
    "c=1: chunk 1,792 at 256 of 2,048": [(1792, 2048)],
    "c=1: one prompt of 1,024": [(1024, 1024)],  # a first token's step
    # No prompt rows: every CTA of the grid finds a decode's slot and exits, so this is the cost of those slots alone.
    "c=256: 254 decodes, no chunk": C256_DECODES,
}


def causal_flops(step: list[tuple[int, int]], q_heads: int, head_dim: int) -> float:
    """QK^T and PV of every prompt row (rows of sequences with one query row are decodes, not counted)."""
    return float(sum(4 * q_heads * head_dim * sum(context - rows + i + 1 for i in range(rows))
                     for rows, context in step if rows >= 2))


@dataclass(frozen=True)
class StepInputs:
    """One step's attention inputs on the GPU: random queries and caches, each sequence's blocks spread at random
    over the pool."""

    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float

    def prompt_rows(self) -> torch.Tensor:
        """Which query rows paged_prefill computes: those of sequences with two or more."""
        return computed_rows(self.query_start_loc, self.query.shape[0])


def step_inputs(shape: str, step: list[tuple[int, int]], cache_dtype: torch.dtype, seed: int = 0) -> StepInputs:
    q_heads, kv_heads, head_dim = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [-(-context // BLOCK_SIZE) for _, context in step]
    num_blocks = sum(blocks)
    caches = [torch.randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim, device="cuda", generator=gen,
                          dtype=torch.bfloat16).to(cache_dtype) for _ in range(2)]
    order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = torch.zeros(len(step), max(blocks), dtype=torch.int32, device="cuda")
    first = 0
    for row, count in enumerate(blocks):
        block_tables[row, :count] = order[first:first + count]
        first += count
    rows = torch.tensor([r for r, _ in step], dtype=torch.int32)
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int32), rows.cumsum(0, dtype=torch.int32)]).cuda()
    seq_lens = torch.tensor([c for _, c in step], dtype=torch.int32, device="cuda")
    query = torch.randn(int(rows.sum()), q_heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    return StepInputs(query, caches[0], caches[1], block_tables, seq_lens, query_start_loc, head_dim ** -0.5)


def time_launch(timer: Timer, prefill: PagedPrefill, inputs: StepInputs,
                tiles: PrefillTiles | None = None) -> tuple[float, torch.Tensor]:
    """(median us, output) of one step's paged_prefill launch, in the launcher's tile shape or `tiles`."""
    out = torch.zeros_like(inputs.query)
    launch = prefill.prepare(out, inputs.query, inputs.key_cache, inputs.block_tables, inputs.seq_lens,
                             inputs.query_start_loc, inputs.scale, tiles)
    us = timer.median_us(lambda _: launch.launch(inputs.key_cache, inputs.value_cache))
    return us, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse --short HEAD)")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    print(f"{torch.cuda.get_device_name()}, commit {commit}, {args.shape}, median of {args.repeats}")
    # Imported here so that the module (and its FLOP count) imports without cupy, as on CPU-only installs.
    from pagedserve.kernels.module_cache import ModuleCache

    timer = Timer(args.repeats)
    device = torch.device("cuda", torch.cuda.current_device())
    prefill = PagedPrefill(ModuleCache(device), torch.cuda.get_device_properties(device).multi_processor_count)
    q_heads, _, head_dim = SHAPES[args.shape]
    print(f"{'step':50s} {'cache':5s} {'us':>8s} {'TFLOP/s':>8s} {'checksum':>14s}")
    for name, step in STEPS.items():
        flops = causal_flops(step, q_heads, head_dim)
        for cache_dtype, label in ((torch.bfloat16, "bf16"), (FP8_DTYPE, "fp8")):
            us, out = time_launch(timer, prefill, step_inputs(args.shape, step, cache_dtype))
            checksum = float(out.float().sum())
            print(f"{name:50s} {label:5s} {us:8.1f} {flops / us / 1e6:8.1f} {checksum:14.6e}", flush=True)


if __name__ == "__main__":
    main()
