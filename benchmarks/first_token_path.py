"""Where a request's first token spends its time, leg by leg across the client, the frontend, the engine and the
worker: one-token requests sent one at a time to a server whose processes mark the functions the token passes
through (benchmarks/path_clock.py), and the median of each leg between consecutive marks.

    python -m benchmarks.first_token_path --model-shape llama-3.2-1b --input-len 1024
    python -m benchmarks.first_token_path --model DIR --load-format dummy --input-len 32

The marks cost their own time (two clock reads and a list append per call), so the TTFT under them reads a little
higher than without; the legs are for finding where the time goes, the serving benchmark for the TTFT itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.direct_client import direct_sender
from benchmarks.model_shapes import SHAPES, sampling_vocab_size, write_model_dir
from benchmarks.path_clock import Hook, Mark, marks_for_children, read_marks
from benchmarks.random_dataset import BenchRequest, sample_random_requests
from benchmarks.serving import server_process, wait_serving

# The functions marked, in the order a first token meets them.
HOOKS: tuple[Hook, ...] = (
    ("pagedserve.control_plane.frontend.service", "GenerationServicer._admit"),
    ("pagedserve.control_plane.frontend.engine_client", "EngineClient.add_request"),
    ("pagedserve.control_plane.engine.service", "EngineServicer._add"),
    ("pagedserve.control_plane.scheduling.scheduler", "Scheduler.schedule"),
    ("pagedserve.control_plane.engine.worker_client", "GrpcWorkerClient.send"),
    ("pagedserve.contract.codec", "step_plan_from_proto"),
    ("pagedserve.gpu_worker.worker", "Worker.launch"),
    ("pagedserve.gpu_worker.model_runner", "ModelRunner.launch"),
    ("pagedserve.gpu_worker.worker", "Worker.finish"),
    ("pagedserve.contract.codec", "step_result_to_proto"),
    ("pagedserve.control_plane.engine.worker_client", "GrpcWorkerClient.receive"),
    ("pagedserve.control_plane.relay.item_channel", "ItemChannel.put"),
)
# (process, event): the marks a first token passes, in order; each leg runs from one to the first of the next after
# it. The frontend and the engine both hand items over an ItemChannel: its put is the engine's chunk for the relay,
# then the frontend's chunk for the client's stream.
PATH: tuple[tuple[str, str], ...] = (
    ("frontend", "GenerationServicer._admit:in"),
    ("frontend", "EngineClient.add_request:out"),
    ("engine", "EngineServicer._add:in"),
    ("engine", "EngineServicer._add:out"),
    ("engine", "Scheduler.schedule:in"),
    ("engine", "Scheduler.schedule:out"),
    ("engine", "GrpcWorkerClient.send:in"),
    ("worker", "step_plan_from_proto:in"),
    ("worker", "step_plan_from_proto:out"),
    ("worker", "Worker.launch:in"),
    ("worker", "ModelRunner.launch:in"),
    ("worker", "ModelRunner.launch:out"),
    ("worker", "Worker.launch:out"),
    ("worker", "Worker.finish:in"),
    ("worker", "step_result_to_proto:out"),
    ("engine", "GrpcWorkerClient.receive:out"),
    ("engine", "ItemChannel.put:in"),
    ("frontend", "ItemChannel.put:in"),
)
# Which process wrote a file of marks: the first of these events it holds names it.
_ROLE_EVENTS = (("frontend", "GenerationServicer._admit:in"), ("engine", "EngineServicer._add:in"),
                ("worker", "Worker.launch:in"))
HEADERS = ("from", "to", "p50 us", "p90 us")


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """One request as its client saw it, on the marks' clock (time.perf_counter, in nanoseconds)."""

    start_ns: int
    first_token_ns: int


def role_of(marks: Sequence[Mark]) -> str | None:
    events = {event for event, _, _ in marks}
    return next((role for role, event in _ROLE_EVENTS if event in events), None)


def legs(records: Sequence[ClientRecord], marks_by_role: Mapping[str, Sequence[Mark]]
         ) -> tuple[list[tuple[str, str, list[float]]], int]:
    """Each leg of PATH, from the client's start to its first token, as (from, to, microseconds per request), over
    the requests that passed every mark in order before their first token; and how many did."""
    times: dict[tuple[str, str], list[int]] = {}
    for role, marks in marks_by_role.items():
        for event, ns, _ in marks:
            times.setdefault((role, event), []).append(ns)
    for series in times.values():
        series.sort()
    names = ["client: request sent", *(f"{role}: {event}" for role, event in PATH), "client: first token"]
    durations: list[list[float]] = [[] for _ in range(len(names) - 1)]
    num_complete = 0
    for record in records:
        points = [record.start_ns]
        for mark in PATH:
            series = times.get(mark, [])
            index = bisect_left(series, points[-1])
            if index == len(series) or series[index] > record.first_token_ns:
                break
            points.append(series[index])
        else:
            points.append(record.first_token_ns)
            num_complete += 1
            for leg, (start, end) in enumerate(pairwise(points)):
                durations[leg].append((end - start) / 1e3)
    return [(names[i], names[i + 1], durations[i]) for i in range(len(durations))], num_complete


async def send_one_at_a_time(address: str, requests: Sequence[BenchRequest], num_warmups: int) -> list[ClientRecord]:
    """The requests through the serving benchmark's direct client, each sent when the one before ended; the
    warm-ups are not recorded."""
    records = []
    async with direct_sender(address, ignore_eos=True) as send:
        for index, request in enumerate(requests):
            record = await send(request, None)
            if record.error is not None:
                raise RuntimeError(f"request {index} failed: {record.error}")
            if index >= num_warmups:
                records.append(ClientRecord(round(record.start_s * 1e9), round(record.chunk_times_s[0] * 1e9)))
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="model directory (config.json + tokenizer)")
    model.add_argument("--model-shape", choices=sorted(SHAPES), help="write a named shape to a temporary directory")
    parser.add_argument("--tokenizer-dir", type=Path, default=Path("../shared/tokenizers/llama2"),
                        help="for --model-shape")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--load-format", default="dummy", choices=["dummy", "safetensors", "auto"])
    parser.add_argument("--serve-args", default="", help="more `pagedserve serve` flags, one shell-quoted string")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--num-warmups", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return parser


def _server_args(args: argparse.Namespace) -> argparse.Namespace:
    """What serving.server_process reads: this benchmark's model flags, the rest at their defaults."""
    return argparse.Namespace(load_format=args.load_format, dtype=args.dtype, kv_cache_dtype="auto",
                              quantization="none", tensor_parallel_size=1, quantize_lm_head=False,
                              serve_args=args.serve_args)


def _marks_by_role(directory: Path) -> dict[str, list[Mark]]:
    by_role: dict[str, list[Mark]] = {}
    for marks in read_marks(directory):
        role = role_of(marks)
        if role is not None:
            by_role.setdefault(role, []).extend(marks)
    return by_role


def _measure(model_dir: Path, args: argparse.Namespace, scratch: Path) -> tuple[list[ClientRecord], dict[str, Any]]:
    """Serves the model with the marks on, sends the requests, stops the server (each process writes its marks as
    it exits) and reads them back."""
    requests = sample_random_requests(args.num_warmups + args.num_prompts, args.input_len, 1, 0.0,
                                      sampling_vocab_size(model_dir), args.seed)
    with (marks_for_children(HOOKS, scratch) as marks_dir,
          server_process(model_dir, _server_args(args), scratch / "server.log") as (address, process)):
        wait_serving(address, process, scratch / "server.log", args.server_timeout)
        records = asyncio.run(send_one_at_a_time(address, requests, args.num_warmups))
    return records, _marks_by_role(marks_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagedserve-path-") as scratch:
        model_dir = args.model or write_model_dir(SHAPES[args.model_shape], Path(scratch) / args.model_shape,
                                                  args.tokenizer_dir)
        records, marks_by_role = _measure(model_dir, args, Path(scratch))
    missing = sorted({"frontend", "engine", "worker"} - set(marks_by_role))
    if missing:
        raise SystemExit(f"no marks came back from the {', '.join(missing)}: did the process exit normally?")
    leg_rows, num_complete = legs(records, marks_by_role)
    if not num_complete:
        raise SystemExit("no request passed every mark in order: PATH no longer follows the code")
    medians = [round(statistics.median(us)) for _, _, us in leg_rows]
    rows = [[start, end, p50, round(statistics.quantiles(us, n=10)[-1])]
            for (start, end, us), p50 in zip(leg_rows, medians, strict=True)]
    ttft_us = [(r.first_token_ns - r.start_ns) / 1e3 for r in records]
    metadata = report.run_metadata("first-token-path", report.local_device())
    summary = (f"{len(records)} one-token requests of {args.input_len} prompt tokens, one at a time, after "
               f"{args.num_warmups} warm-ups; {num_complete} passed every mark in order. TTFT under the marks: p50 "
               f"{statistics.median(ttft_us):.0f} us; the legs' medians sum to {sum(medians)} us.\n")
    result = {"metadata": metadata, "config": {k: str(v) for k, v in vars(args).items()},
              "num_requests": len(records), "num_complete": num_complete,
              "ttft_p50_us": statistics.median(ttft_us), "legs": [dict(zip(HEADERS, row, strict=True)) for row in rows]}
    markdown = report.markdown_report("Where the first token's time goes", metadata, [
        ("Workload", summary), ("Legs", report.markdown_table(HEADERS, rows))])
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result, markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(summary + report.text_table(HEADERS, rows))
    return result


if __name__ == "__main__":
    main()
