"""Recorded kernel profiles (benchmarks.kernel_profile's JSON) side by side, each kernel's device time per step
summed into the parts of a decoder step: GEMMs, attention, the element-wise kernels, the FP8 quantization.

    python -m benchmarks.kernel_groups benchmarks/results/2026-12-04-kernel-profile-*.json

A kernel belongs to the first group one of whose name fragments it contains, else to "other"; the fused kernels
(silu_and_mul_fp8, add_rms_norm_fp8) count with the op they fuse into.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GEMMs", ("nvjet", "gemm", "splitKreduce")),  # cuBLAS's kernels, the LM head's included
    ("decode GEMV", ("decode_gemv<", "decode_gemv_mma<", "fp8_gemv<")),  # fp8_gemv: its name before 16-bit weights
    ("per-token quantization", ("quantize_fp8_per_row",)),
    ("FP8 product scaling", ("scale_fp8_product",)),
    ("SiLU-and-mul", ("silu_and_mul",)),
    ("norms", ("rms_norm",)),
    ("rotary + KV write", ("rotary_write_kv",)),
    ("prompt attention", ("paged_prefill",)),
    ("decode attention", ("paged_decode",)),
)
OTHER = "other"
DEVICE_BUSY = "device busy"


def group_of(kernel: str) -> str:
    return next((group for group, fragments in GROUPS if any(f in kernel for f in fragments)), OTHER)


def grouped_us_per_step(profile: Mapping[str, Any]) -> dict[str, float]:
    """Device us per engine step of each group, and of all kernels, in one kernel_profile JSON; then the device's busy
    time (the union of the kernels' intervals: overlapping dependent launches counted once) where it was recorded."""
    steps = max(int(profile["steps"]), 1)
    totals = dict.fromkeys([*(group for group, _ in GROUPS), OTHER], 0.0)
    for kernel, entry in profile["kernels"].items():
        totals[group_of(kernel)] += entry["total_us"] / steps
    totals["all kernels"] = sum(totals.values())
    if "device_busy_us" in profile:
        totals[DEVICE_BUSY] = profile["device_busy_us"] / steps
    return totals


def label(profile: Mapping[str, Any]) -> str:
    config = profile["config"]
    return (f"{profile['model']} {config['quantization']}/{config['kv_cache_dtype']} "
            f"c={config['max_num_seqs']} @{profile['metadata']['commit'][:7]}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_groups", description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path, help="kernel_profile JSON files")
    args = parser.parse_args(argv)
    profiles = [json.loads(path.read_text()) for path in args.profiles]
    grouped = [grouped_us_per_step(profile) for profile in profiles]
    headers = ["us per step", *(label(profile) for profile in profiles)]
    names = list(dict.fromkeys(name for totals in grouped for name in totals))
    rows = [[name, *(round(totals[name]) if name in totals else "-" for totals in grouped)] for name in names]
    print(report.text_table(headers, rows))
    return grouped


if __name__ == "__main__":
    main()
