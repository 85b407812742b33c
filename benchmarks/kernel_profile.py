"""Where the device's time goes in an offline run: every kernel's total time, per step and per call, from torch's
profiler over `LLM.generate` with the worker on a thread of this process (so that its launches are seen).

The workload is the throughput benchmark's (random prompts, greedy, ignore_eos); `--max-num-seqs` and
`--max-num-batched-tokens` shape its steps, so `--max-num-seqs 64 --max-num-batched-tokens 2048` gives the steps a
server at concurrency 64 makes. Run it for two configurations (bf16 and FP8, say) to see which kernels a change of
dtype speeds up and which it does not (benchmarks.kernel_groups puts recorded runs side by side).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from benchmarks import report
from benchmarks.hardware_bound import device_name
from benchmarks.kernel_groups import grouped_us_per_step
from benchmarks.model_shapes import SHAPES, add_model_arguments, sampling_vocab_size, write_model_dir
from benchmarks.random_dataset import sample_random_requests
from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat

_HEADERS = ("kernel", "calls/step", "us/step", "us/call", "% of kernel time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_profile", description=__doc__)
    add_model_arguments(p, "model directory (config.json + tokenizer [+ safetensors])")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "safetensors", "auto"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "fp8"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--no-dependent-launch", action="store_true",
                   help="launch every kernel plainly: a dependent launch's profiled time includes its wait for the "
                        "kernel before, so only plain launches' times add up to the step's")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=25, help="kernels listed, by total time")
    p.add_argument("--name-width", type=int, default=90, help="characters of a kernel's name kept")
    p.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    p.add_argument("--tag", default="", help="added to the result file's name (bf16, fp8, ...)")
    return p


def kernel_totals(events: Sequence[Any], name_width: int) -> dict[str, tuple[int, float]]:
    """(calls, total us) of each device kernel, by name cut to name_width characters."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.device_type == DeviceType.CUDA and event.device_time_total > 0:
            entry = totals[event.key[:name_width]]
            entry[0] += event.count
            entry[1] += event.device_time_total
    return {name: (int(calls), total) for name, (calls, total) in totals.items()}


def device_time(events: Sequence[Any]) -> tuple[float, float]:
    """(busy, span) in us of the device's work: busy is the union of its kernels' and copies' intervals, span from the
    first start to the last end. Under dependent launches a kernel's interval opens while the one before it still
    runs (it waits for it on the device), so the sum of kernel times counts those overlaps twice and busy does not;
    span - busy is the time no kernel or copy ran."""
    intervals = sorted((event.time_range.start, event.time_range.end) for event in events
                       if event.device_type == DeviceType.CUDA and event.time_range.end > event.time_range.start)
    if not intervals:
        return 0.0, 0.0
    busy, covered_to = 0.0, intervals[0][0]
    for start, end in intervals:
        if end > covered_to:
            busy += end - max(start, covered_to)
            covered_to = end
    return busy, covered_to - intervals[0][0]


def profile_run(model_dir: Path, args: argparse.Namespace) -> tuple[dict[str, tuple[int, float]], int,
                                                                     tuple[float, float]]:
    """Kernel totals over one generate call of the workload, the engine steps it took, and the device's busy time
    and span over it (device_time)."""
    from pagedserve.clients.llm import LLM, SamplingParams
    from pagedserve.control_plane.config import SchedulerConfig

    requests = sample_random_requests(args.num_prompts, args.input_len, args.output_len, 0.0,
                                      sampling_vocab_size(model_dir), args.seed)
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len)
    with LLM(model_dir, dtype=DType(args.dtype), device=DeviceKind.CUDA, load_format=LoadFormat(args.load_format),
             seed=args.seed, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
             dependent_launch=not args.no_dependent_launch, scheduler_config=scheduler, worker_process=False) as llm:
        warmups = sample_random_requests(2, 16, 4, 0.0, sampling_vocab_size(model_dir), args.seed - 1)
        llm.generate([r.prompt_token_ids for r in warmups], SamplingParams(max_tokens=4, temperature=0.0),
                     use_tqdm=False)
        params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
        steps_before = llm.status().num_steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
            torch.cuda.synchronize()
        steps = llm.status().num_steps - steps_before
    return kernel_totals(prof.key_averages(), args.name_width), steps, device_time(prof.events())


def rows(totals: dict[str, tuple[int, float]], steps: int, top: int) -> list[list[object]]:
    """The top kernels by total time, then the rest and the sum, per step."""
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)
    all_us = sum(total for _, total in totals.values()) or 1.0
    table: list[list[object]] = [[name, calls / steps, total / steps, total / calls, 100.0 * total / all_us]
                                 for name, (calls, total) in ranked[:top]]
    rest = ranked[top:]
    rest_calls, rest_us = sum(c for _, (c, _) in rest), sum(t for _, (_, t) in rest)
    table.append([f"({len(rest)} others)", rest_calls / steps, rest_us / steps, rest_us / max(rest_calls, 1),
                  100.0 * rest_us / all_us])
    table.append(["all kernels", sum(c for c, _ in totals.values()) / steps, all_us / steps, "-", 100.0])
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as scratch:
        model_dir = (write_model_dir(SHAPES[args.model_shape], Path(scratch) / args.model_shape, args.tokenizer_dir)
                     if args.model_shape else args.model)
        totals, steps, (busy_us, span_us) = profile_run(model_dir, args)
        model_name = model_dir.name
    table = rows(totals, max(steps, 1), args.top)
    metadata = report.run_metadata("kernel-profile" + (f"-{args.tag}" if args.tag else ""),
                                   device_name(torch.device("cuda")))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"metadata": metadata, "config": config, "model": model_name, "steps": steps,
              "device_busy_us": busy_us, "device_span_us": span_us,
              "kernels": {name: {"calls": calls, "total_us": total} for name, (calls, total) in totals.items()}}
    device_line = (f"device busy {busy_us / max(steps, 1):.0f} us a step (the union of its kernels' intervals), "
                   f"over a span of {span_us / max(steps, 1):.0f} us a step")
    markdown = report.markdown_report(f"Kernel profile: {model_name}", metadata, [
        ("Workload", f"{args.num_prompts} random prompts of {args.input_len} tokens in, {args.output_len} out, "
                     f"greedy; max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
                     f"{args.max_num_batched_tokens}; dtype {args.dtype}, quantization {args.quantization}, KV "
                     f"cache {args.kv_cache_dtype}; {steps} steps; "
                     + ("plain launches.\n" if args.no_dependent_launch else
                        "dependent launches (a kernel's time includes its wait for the one before).\n")),
        ("Kernels", report.markdown_table(_HEADERS, table)),
        ("Device", device_line + ".\n"),
    ])
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result, markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"{steps} steps")
    print(report.text_table(_HEADERS, table))
    print(device_line)
    print(report.text_table(("group", "us/step"), [[group, round(us)] for group, us in
                                                    grouped_us_per_step(result).items()]))
    return result


if __name__ == "__main__":
    from pagedserve.runtime.logs import LogFormat, configure_logging

    configure_logging(LogFormat.CONSOLE, logging.WARNING)
    main()
