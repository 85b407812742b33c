"""The speed targets of the performance issues (served, offline, the decode attention's), each measured beside its
bound and checked.

    python -m benchmarks.targets --groups 1b-c1,1b-c64 [--rounds N] [--result-dir DIR]

A group runs one or more benchmarks on this machine, one after the other (benchmarks.serving against a server of its
own, or benchmarks.throughput), each writing its own record into <result-dir>/<group>-<call>/, and then checks its
targets against what they measured. A ratio target (FP8 against bf16, a JSON schema on every request against none)
divides two runs of one group, so both come from the same machine within minutes. Prints target, measured, limit
and whether it is met, and writes <date>-targets-<device>.{json,md} with each record's runs. A group that fails (a
server that does not start, a run with failed requests) is recorded with its error, the next group still runs, and
the exit status is 1. The `attention` group runs benchmarks.kernel_attention with a 16-bit and an FP8 cache for
the decode attention's targets, each a share of the read ceiling that run measured.

With --rounds N every group runs its calls N times in turn (a fresh server each time), each round's records in
folders of their own; a target's measured value is the median of its rounds' values, which are listed beside it. A
ratio target divides two runs of one round. One round of the 1B c=64 pair (five seconds a run) spread its JSON schema
/ none ratio over 1.02-1.16 on one machine (benchmarks/results/2026-12-07-stream-gate-not-kept-nvidia-h100.md), so a
verdict on a target that close to its limit takes several.

Every workload is the issues' own: random weights (`--load-format dummy`), bf16, 1,024 tokens in, 128 out, greedy,
`ignore_eos`, `--max-model-len 2048`; at 1B c=256 with four frontend and four client processes (below).
"""

from __future__ import annotations

import argparse
import operator
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import kernel_attention, report, serving, throughput

FP8 = ("--quantization", "fp8", "--kv-cache-dtype", "fp8")
LEAST_AT_SCALE = "least % of ceiling at b >= 16, ctx >= 2048"
NUM_PROCESSES_AT_1B_C256 = 4  # frontend processes, client processes, connections a client


@dataclass(frozen=True)
class Call:
    """One benchmark run of a group: `name` labels its runs (name/structured-output mode, or name/backend)."""

    name: str
    benchmark: str  # "serving", "throughput" or "attention"
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Measure:
    """A metric of one labelled run, e.g. ("bf16/none", "median_tpot_ms")."""

    run: str
    metric: str


@dataclass(frozen=True)
class Target:
    """value (divided by `over` when given) must be at most `limit` (at_most) or at least it."""

    issue: int
    name: str
    value: Measure
    limit: float
    at_most: bool
    over: Measure | None = None

    def measured(self, runs: dict[str, dict[str, Any]]) -> float:
        value = float(runs[self.value.run][self.value.metric])
        return value if self.over is None else value / float(runs[self.over.run][self.over.metric])

    def is_met(self, measured: float) -> bool:
        compare: Callable[[float, float], bool] = operator.le if self.at_most else operator.ge
        return compare(measured, self.limit)


@dataclass(frozen=True)
class Group:
    """Benchmark calls run one after the other on one machine, and the targets read from their runs."""

    calls: tuple[Call, ...]
    targets: tuple[Target, ...]


def served(shape: str, concurrency: int, num_prompts: int, *more: str, num_processes: int = 1) -> tuple[str, ...]:
    """benchmarks.serving's argv for the issues' served workload at one concurrency; with num_processes > 1 the
    server runs that many frontend processes and the benchmark that many client processes of that many connections
    each (the frontends share out connections, not streams: docs/deployment.md)."""
    serve_args = "--max-model-len=2048" + (f" --frontend-processes {num_processes}" if num_processes > 1 else "")
    clients = (("--client-processes", str(num_processes), "--connections", str(num_processes))
               if num_processes > 1 else ())
    return ("--model-shape", shape, f"--serve-args={serve_args}", "--random-input-len", "1024",
            "--random-output-len", "128", "--max-concurrency", str(concurrency), "--num-prompts", str(num_prompts),
            *clients, *more)


def _tpot(run: str) -> Measure:
    return Measure(run, "median_tpot_ms")


def _bf16_and_fp8(shape: str, concurrency: int, num_prompts: int, num_processes: int = 1) -> tuple[Call, Call]:
    """The workload served twice, in bf16 and then with FP8 weights and KV cache."""
    return (Call("bf16", "serving", served(shape, concurrency, num_prompts, num_processes=num_processes)),
            Call("fp8", "serving", served(shape, concurrency, num_prompts, *FP8, num_processes=num_processes)))


def _fp8_speed_up(name: str, limit: float) -> Target:
    """FP8's output tokens/s over bf16's, at least limit."""
    return Target(21, name, Measure("fp8/none", "output_throughput"), limit, at_most=False,
                  over=Measure("bf16/none", "output_throughput"))


GROUPS: dict[str, Group] = {
    "1b-c1": Group(
        (Call("bf16", "serving", served("llama-3.2-1b", 1, 64)),),
        (Target(17, "1B c=1 TPOT p50 ms", _tpot("bf16/none"), 0.75, at_most=True),
         Target(17, "1B c=1 TTFT p50 ms", Measure("bf16/none", "median_ttft_ms"), 8.0, at_most=True)),
    ),
    "8b-c1": Group(
        _bf16_and_fp8("llama-3-8b", 1, 64),
        (Target(17, "8B c=1 TPOT p50 ms", _tpot("bf16/none"), 4.1, at_most=True),
         Target(21, "8B c=1 TPOT p50 ms, FP8 weights + KV", _tpot("fp8/none"), 2.3, at_most=True)),
    ),
    "1b-c64": Group(
        (Call("bf16", "serving", served("llama-3.2-1b", 64, 640, "--structured-output", "none,schema")),),
        (Target(17, "1B c=64 % of bound", Measure("bf16/none", "percent_of_bound"), 75.0, at_most=False),
         Target(18, "1B c=64 TPOT p50, JSON schema / none", _tpot("bf16/schema"), 1.10, at_most=True,
                over=_tpot("bf16/none"))),
    ),
    # 20,000-26,000 output tokens/s and 150-200 prompts of 1,024 tokens a second: on an H200 four frontend and four
    # client processes served FP8 19.6 % more than one of each, and bf16 7.5 % more
    # (benchmarks/results/2026-12-04-frontend-processes-nvidia-h200-e49d6c0.md), so both runs take four of each, as
    # docs/deployment.md advises near that rate.
    "1b-c256": Group(
        _bf16_and_fp8("llama-3.2-1b", 256, 1536, num_processes=NUM_PROCESSES_AT_1B_C256),
        (Target(17, "1B c=256 % of bound", Measure("bf16/none", "percent_of_bound"), 80.0, at_most=False),
         _fp8_speed_up("1B c=256 output tokens/s, FP8 / bf16", 1.3)),
    ),
    "8b-c64": Group(
        _bf16_and_fp8("llama-3-8b", 64, 640),
        (_fp8_speed_up("8B c=64 output tokens/s, FP8 / bf16", 1.7),),
    ),
    "1b-offline": Group(
        (Call("offline", "throughput", ("--model-shape", "llama-3.2-1b", "--max-model-len", "2048",
                                        "--hf-backends", "hf-generate-batch")),),
        (Target(17, "1B offline % of bound", Measure("offline/pagedserve", "percent_of_bound"), 80.0,
                at_most=False),
         Target(17, "1B offline output tokens/s, pagedserve / transformers generate_batch",
                Measure("offline/pagedserve", "output_tokens_per_s"), 50.0, at_most=False,
                over=Measure("offline/hf-generate-batch", "output_tokens_per_s"))),
    ),
    # The pool's size alone: the model's weights stay bf16, so only the cache's element size differs.
    "kv-capacity": Group(
        (Call("bf16-kv", "serving", served("llama-3-8b", 8, 16)),
         Call("fp8-kv", "serving", served("llama-3-8b", 8, 16, "--kv-cache-dtype", "fp8"))),
        (Target(21, "KV cache blocks at gpu_memory_utilization 0.9, FP8 cache / bf16 (2.0x within 2 %)",
                Measure("fp8-kv/none", "kv_cache_blocks"), 1.96, at_most=False,
                over=Measure("bf16-kv/none", "kv_cache_blocks")),),
    ),
    "attention": Group(
        (Call("bf16", "attention", ("--repeats", "20")),
         Call("fp8", "attention", ("--repeats", "20", "--kv-cache-dtype", "fp8"))),
        (Target(17, "decode attention, 1B 16 x 2,048, % of the read ceiling",
                Measure("bf16/decode", "llama-3.2-1b 16x2048 % of ceiling"), 85.0, at_most=False),
         Target(21, "decode attention, FP8 cache, least % of the read ceiling at b >= 16, ctx >= 2k",
                Measure("fp8/decode", LEAST_AT_SCALE), 80.0, at_most=False)),
    ),
    # No target of its own: the issue asks for these to be measured and recorded beside the others.
    "measured-too": Group(
        (Call("8b-c256", "serving", served("llama-3-8b", 256, 1536)),
         Call("tinyllama-c1", "serving", served("tinyllama-1.1b", 1, 64)),
         Call("tinyllama-c64", "serving", served("tinyllama-1.1b", 64, 640))),
        (),
    ),
}

BENCHMARKS: dict[str, Callable[[Sequence[str]], dict[str, Any]]] = {
    "serving": serving.main, "throughput": throughput.main, "attention": kernel_attention.main,
}

HEADERS = ("issue", "target", "measured", "limit", "met", "rounds")


def labelled_runs(call: Call, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A benchmark record's runs by label: call/structured-output mode (serving), call/backend (throughput),
    call/decode (attention: decode_shares)."""
    if call.benchmark == "serving":
        return {f"{call.name}/{run['structured_output']}": run for run in record["runs"]}
    if call.benchmark == "attention":
        return {f"{call.name}/decode": decode_shares(record)}
    return {f"{call.name}/{backend['backend']}": backend for backend in record["backends"]}


def decode_shares(record: dict[str, Any]) -> dict[str, float]:
    """An attention record's decode launches as shares of its read ceiling: "<shape> <batch>x<context> % of
    ceiling" for each, and LEAST_AT_SCALE, the least of those at batch >= 16 and context >= 2,048."""
    ceiling = max(record["ceiling"].values())
    launches = [(r, 100.0 * r["paged_gbps"] / ceiling) for r in record["decode"]]
    shares = {f"{r['shape']} {r['batch']}x{r['context']} % of ceiling": share for r, share in launches}
    shares[LEAST_AT_SCALE] = min(share for r, share in launches if r["batch"] >= 16 and r["context"] >= 2048)
    return shares


def call_dir(result_dir: Path, group_name: str, call: Call, round_number: int | None = None) -> Path:
    """Where a call writes its record: a folder of its own, since two calls of one benchmark on one device and day
    would write the same file names; with a round number (several rounds), one for each round."""
    suffix = "" if round_number is None else f"-r{round_number}"
    return result_dir / f"{group_name}-{call.name}{suffix}"


def run_group(group_name: str, group: Group, result_dir: Path,
              rounds: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs the group's calls in order, `rounds` times over, each writing its record into its call_dir; returns,
    per call and round, its metadata, folder and labelled runs, and one row per target: the median of its rounds'
    values (each read from one round's runs), met or not by that median."""
    records, runs_by_round = [], []
    for round_number in range(1, rounds + 1):
        runs: dict[str, dict[str, Any]] = {}
        for call in group.calls:
            folder = call_dir(result_dir, group_name, call, round_number if rounds > 1 else None)
            record = BENCHMARKS[call.benchmark]([*call.argv, "--result-dir", str(folder)])
            labelled = labelled_runs(call, record)
            for label, run in labelled.items():
                if run.get("failed"):  # its latencies and tokens/s are of the requests that succeeded: no measurement
                    raise RuntimeError(f"{label}: {run['failed']} of {run['num_prompts']} requests failed "
                                       f"({run.get('errors')}); its targets are not checked")
            records.append({"group": group_name, "benchmark": call.benchmark, "call": call.name,
                            "round": round_number, "metadata": record["metadata"], "folder": folder.name,
                            "runs": labelled})
            runs.update(labelled)
        runs_by_round.append(runs)
    rows = []
    for target in group.targets:
        values = [target.measured(runs) for runs in runs_by_round]
        measured = statistics.median(values)
        rows.append({"issue": target.issue, "target": target.name, "measured": measured, "rounds": values,
                     "limit": target.limit, "at_most": target.at_most, "met": target.is_met(measured)})
    return records, rows


def _table_rows(rows: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[r["issue"], r["target"], r["measured"], ("<= " if r["at_most"] else ">= ") + f"{r['limit']:g}",
             "yes" if r["met"] else "no", ", ".join(f"{value:.4g}" for value in r["rounds"])] for r in rows]


def main(argv: Sequence[str] | None = None, groups: dict[str, Group] | None = None) -> dict[str, Any]:
    """Runs the named groups (of `groups`, GROUPS by default), writes <result-dir>/<date>-targets-<device>.{json,md};
    returns the JSON record."""
    groups = GROUPS if groups is None else groups
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default=",".join(groups),
                        help=f"comma-separated, of: {', '.join(groups)} (default: all, in that order)")
    parser.add_argument("--rounds", type=report.positive_int, default=1,
                        help="runs of each group's calls in turn; each target is the median of its rounds")
    parser.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = parser.parse_args(argv)
    names = report.listed_names(parser, "--groups", args.groups, list(groups))
    records, rows, failures = [], [], []
    for name in names:
        try:
            group_records, group_rows = run_group(name, groups[name], args.result_dir, args.rounds)
        except Exception as error:  # the next group still runs; the record and the exit status name this one
            failures.append({"group": name, "error": f"{type(error).__name__}: {error}"})
            print(f"group {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        records += group_records
        rows += [{"group": name, **row} for row in group_rows]
    metadata = report.run_metadata("targets", report.local_device())
    result = {"metadata": metadata, "groups": names, "records": records, "targets": rows, "failures": failures}
    sections = [
        ("Targets", report.markdown_table(HEADERS, _table_rows(rows))),
        ("Records", "".join(f"- {r['group']} / {r['call']} (round {r['round']}): {r['benchmark']}, "
                            f"{r['metadata']['date']}, in {r['folder']}/\n" for r in records)),
    ]
    if failures:
        sections.append(("Failed groups", "".join(f"- {f['group']}: {f['error']}\n" for f in failures)))
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result,
                                 report.markdown_report("Speed targets", metadata, sections))
    print("wrote " + ", ".join(str(p) for p in paths))
    print(report.text_table(HEADERS, _table_rows(rows)))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
