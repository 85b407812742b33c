"""Where a constrained decode step's sampling waits: the serving benchmark's run (a JSON schema on every request by
default) against a server whose worker marks the functions of its deferred sampling (benchmarks/path_clock.py), and
the medians of each leg of the chain from one step's tokens reaching the host to the next step's sampling queued.

    python -m benchmarks.mask_chain --model-shape llama-3.2-1b --serve-args=--max-model-len=2048 \\
        --random-input-len 1024 --random-output-len 128 --max-concurrency 64 --num-prompts 640

Every flag but --result-dir goes to benchmarks.serving (--no-bound is added). A deferred sampling runs on the
worker's masks thread as two tasks, Worker._token_masks (read the earlier steps' tokens into the registry and feed
them to the grammars, then fill the masks) and Worker._sample_when_masked (queue the sampling under the worker's
lock). The device can run the next step's forward pass only once that sampling is queued, so when the chain from
the tokens to the sampling is longer than the forward pass, the chain sets the step's period. Legs are measured
within each window of the masks thread, from its `_token_masks:in` to its `_sample_when_masked:out`; the chain
only over the windows where the masks thread itself waited for the earlier step's tokens (else another thread read
them first, and when they reached the host is not marked).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks import report, serving
from benchmarks.path_clock import Hook, Mark, marks_for_children, read_marks

HOOKS: tuple[Hook, ...] = (
    ("pagedserve.gpu_worker.worker", "Worker.launch"),
    ("pagedserve.gpu_worker.worker", "Worker._token_masks"),
    ("pagedserve.gpu_worker.worker", "Worker._sample_when_masked"),
    ("pagedserve.gpu_worker.sampler", "PendingSample.result"),
    ("pagedserve.gpu_worker.sequence_state", "SequenceRegistry.fill"),
    ("pagedserve.gpu_worker.grammar", "accept_tokens"),
    ("pagedserve.gpu_worker.model_runner", "RowsAtLaunch.current_rows"),
    ("pagedserve.gpu_worker.grammar", "fill_token_masks"),
    ("pagedserve.gpu_worker.model_runner", "ModelRunner.sample_deferred"),
    ("pagedserve.gpu_worker.sequence_state", "SequenceRegistry.validate"),
    ("pagedserve.gpu_worker.sequence_state", "SequenceRegistry.apply"),
    ("pagedserve.gpu_worker.worker", "Worker._start_token_masks"),
    ("pagedserve.gpu_worker.model_runner", "ModelRunner.launch"),
    ("pagedserve.gpu_worker.worker", "Worker.finish"),
)
TIMELINE_WINDOWS = 200  # windows of the middle of the run whose marks, every thread's, the record keeps
HEADERS = ("leg", "windows", "p50 us", "p90 us")
_START, _END = "Worker._token_masks:in", "Worker._sample_when_masked:out"


def calls(marks: Sequence[Mark], function: str) -> list[tuple[int, int]]:
    """Every call of function, as (in, out) in the order of their starts, each in paired with the next out of its
    own thread."""
    open_calls: dict[int, int] = {}
    spans = []
    for event, ns, thread in marks:
        if event == f"{function}:in":
            open_calls[thread] = ns
        elif event == f"{function}:out" and thread in open_calls:
            spans.append((open_calls.pop(thread), ns))
    return sorted(spans)


def _total(spans: Sequence[tuple[int, int]]) -> float:
    return sum(end - start for start, end in spans) / 1e3


def window_legs(window: Sequence[Mark]) -> dict[str, float] | None:
    """The legs (microseconds) of one window of the masks thread, from `_token_masks:in` to `_sample_when_masked:out`;
    None for a window without a mask fill or a queued sampling (a sampling deferred for penalties alone)."""
    masks, sampling = calls(window, "fill_token_masks"), calls(window, "ModelRunner.sample_deferred")
    if len(masks) != 1 or len(sampling) != 1:
        return None
    (masks_in, masks_out), (sampling_in, sampling_out) = masks[0], sampling[0]
    start, end = window[0][1], window[-1][1]
    token_waits = [span for span in calls(window, "PendingSample.result") if span[1] <= masks_in]
    legs = {
        "registry fill (writes tokens, feeds grammars)": _total(calls(window, "SequenceRegistry.fill")),
        "  of which the grammars' accept_tokens": _total(calls(window, "accept_tokens")),
        "rows as at launch (current_rows)": _total(calls(window, "RowsAtLaunch.current_rows")),
        "mask fill (fill_token_masks)": (masks_out - masks_in) / 1e3,
        "masks filled -> sampling queue starts (task, lock)": (sampling_in - masks_out) / 1e3,
        "sampling queued (sample_deferred)": (sampling_out - sampling_in) / 1e3,
        "whole window": (end - start) / 1e3,
    }
    if token_waits:
        legs["waiting for the earlier steps' tokens (where this thread read them)"] = _total(token_waits)
        legs["chain: tokens on the host -> sampling queued"] = (end - token_waits[-1][1]) / 1e3
    return legs


def masks_thread_windows(marks: Sequence[Mark]) -> list[list[Mark]]:
    """The masks thread's marks (the thread that runs Worker._token_masks), cut into windows that each start at a
    `_token_masks:in` and end at the next `_sample_when_masked:out`."""
    threads = {thread for event, _, thread in marks if event == _START}
    if len(threads) != 1:
        raise ValueError(f"expected one thread running Worker._token_masks, found {len(threads)}")
    (thread,) = threads
    windows: list[list[Mark]] = []
    current: list[Mark] | None = None
    for mark in marks:
        if mark[2] != thread:
            continue
        if mark[0] == _START:
            current = [mark]
        elif current is not None:
            current.append(mark)
            if mark[0] == _END:
                windows.append(current)
                current = None
    return windows


def _first(marks: Sequence[Mark], event: str) -> int | None:
    return next((ns for name, ns, _ in marks if name == event), None)


def _busy_us(spans: Sequence[tuple[int, int]], start_ns: int, end_ns: int) -> float:
    """How long the calls (in the order of their starts) ran inside [start_ns, end_ns]."""
    first = max(0, bisect_left(spans, (start_ns, 0)) - 1)
    return sum(max(0, min(out, end_ns) - max(in_, start_ns))
               for in_, out in spans[first:bisect_right(spans, (end_ns, end_ns))]) / 1e3


def _between(ordered: Sequence[Mark], times: Sequence[int], start_ns: int, end_ns: int) -> Sequence[Mark]:
    """The marks in [start_ns, end_ns] of marks in time order (times: their times)."""
    return ordered[bisect_left(times, start_ns):bisect_right(times, end_ns)]


def launch_legs(ordered: Sequence[Mark], times: Sequence[int], busy: dict[str, list[tuple[int, int]]],
                previous: Sequence[Mark], window: Sequence[Mark]) -> dict[str, float]:
    """The legs between one window's sampling queued and the next window's start (the next step's launch up to its
    masks' submission, on the step thread), and how long other threads ran the functions of `busy` (their calls)
    during the window (us). ordered: every thread's marks in time order; times: their times."""
    queued, start, end = previous[-1][1], window[0][1], window[-1][1]
    between = _between(ordered, times, queued, start)
    legs = {"gap: sampling queued -> the next step's masks start": (start - queued) / 1e3}
    validate = _first(between, "SequenceRegistry.validate:in")
    submitted = _first(between, "Worker._start_token_masks:in")
    if validate is not None and submitted is not None:
        legs["  launch: its wait and the worker's lock (to validate)"] = (validate - queued) / 1e3
        legs["  launch: validate and apply (to the masks' submission)"] = (submitted - validate) / 1e3
        legs["  masks submitted -> their task starts"] = (start - submitted) / 1e3
    for function, spans in busy.items():
        legs[f"during the window: {function}"] = _busy_us(spans, start, end)
    return legs


def chain_rows(marks: Sequence[Mark]) -> list[list[object]]:
    """One row per leg: the number of windows it was measured in and its p50 and p90 (us); then the period between
    successive samplings queued and the step thread's Worker.launch."""
    windows = masks_thread_windows(marks)
    per_leg: dict[str, list[float]] = {}
    for legs in filter(None, map(window_legs, windows)):
        for name, us in legs.items():
            per_leg.setdefault(name, []).append(us)
    ordered = sorted(marks, key=lambda mark: mark[1])
    times = [mark[1] for mark in ordered]
    busy = {function: calls(ordered, function) for function in ("Worker.finish", "ModelRunner.launch")}
    for previous, window in pairwise(windows):
        for name, us in launch_legs(ordered, times, busy, previous, window).items():
            per_leg.setdefault(name, []).append(us)
    queued = [window[-1][1] for window in windows]
    per_leg["period: one sampling queued to the next"] = [(b - a) / 1e3 for a, b in pairwise(queued)]
    per_leg["step thread: Worker.launch"] = [(b - a) / 1e3 for a, b in calls(ordered, "Worker.launch")]
    return [[name, len(us), round(statistics.median(us)), round(_p90(us))] for name, us in per_leg.items() if us]


def _p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def middle_marks(marks: Sequence[Mark], num_windows: int = TIMELINE_WINDOWS) -> list[Mark]:
    """Every thread's marks over num_windows windows of the middle of the run, in time order: a timeline to read."""
    windows = masks_thread_windows(marks)
    if not windows:
        return []
    first = max(0, len(windows) // 2 - num_windows // 2)
    last = min(len(windows), first + num_windows) - 1
    start, end = windows[first][0][1], windows[last][-1][1]
    ordered = sorted(marks, key=lambda mark: mark[1])
    return list(_between(ordered, [mark[1] for mark in ordered], start, end))


def _worker_marks(directory: Path) -> list[Mark]:
    for marks in read_marks(directory):
        if any(event == _START for event, _, _ in marks):
            return marks
    raise SystemExit("no worker marked a deferred sampling: no request was constrained, or the worker did not exit "
                     "normally")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args, serving_argv = parser.parse_known_args(argv)
    if not any(flag.startswith("--structured-output") for flag in serving_argv):
        serving_argv += ["--structured-output", "schema"]
    with tempfile.TemporaryDirectory(prefix="pagedserve-mask-chain-") as scratch:
        with marks_for_children(HOOKS, Path(scratch)) as marks_dir:
            served = serving.main([*serving_argv, "--no-bound", "--result-dir", str(args.result_dir)])
        worker_marks = _worker_marks(marks_dir)
        rows = chain_rows(worker_marks)
    metadata = report.run_metadata("mask-chain", served["metadata"]["device"])
    runs = [{key: run[key] for key in ("structured_output", "max_concurrency", "median_tpot_ms", "median_itl_ms",
                                       "output_throughput")} for run in served["runs"]]
    result = {"metadata": metadata, "serving_argv": serving_argv, "runs": runs,
              "legs": [dict(zip(HEADERS, row, strict=True)) for row in rows],
              "timeline": [list(mark) for mark in middle_marks(worker_marks)]}
    markdown = report.markdown_report("Where a constrained decode step's sampling waits", metadata, [
        ("Workload", f"`python -m benchmarks.serving {' '.join(serving_argv)} --no-bound` under the marks.\n"),
        ("Served", report.markdown_table(list(runs[0]), [list(run.values()) for run in runs])),
        ("Legs of the masks thread", report.markdown_table(HEADERS, rows)),
    ])
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result, markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    print(report.text_table(list(runs[0]), [list(run.values()) for run in runs]))
    print(report.text_table(HEADERS, rows))
    return result


if __name__ == "__main__":
    main()
