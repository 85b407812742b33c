"""Benchmark records: run metadata, JSON, markdown tables, optional PNG plots and the closing console table."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULT_DIR = REPO_ROOT / "benchmarks" / "results"

Row = Sequence[object]


def git_commit(root: Path = REPO_ROOT) -> str:
    """HEAD of the repository the benchmarks live in, with "-dirty" when a tracked file differs from it (the record
    then measured code that no commit holds as it ran); outside a checkout (a copied tree on a GPU host) the
    PAGEDSERVE_BENCH_COMMIT variable names it, else "unknown"."""
    if os.environ.get("PAGEDSERVE_BENCH_COMMIT"):
        return os.environ["PAGEDSERVE_BENCH_COMMIT"]
    try:
        head, changed = (
            subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
            for args in (("rev-parse", "HEAD"), ("status", "--porcelain", "--untracked-files=no"))
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else head


def local_device() -> str:
    """This process's CUDA device by name, or "cpu" where none is visible: a record's device when the benchmark
    measured none itself."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_metadata(benchmark: str, device: str) -> dict[str, str]:
    """Who ran what, where and when: commit, device, the exact command line, UTC date."""
    return {
        "benchmark": benchmark,
        "commit": git_commit(),
        "device": device,
        "command": shlex.join(sys.orig_argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def listed_names(parser: argparse.ArgumentParser, flag: str, value: str, known: Sequence[str]) -> list[str]:
    """The comma-separated names of a flag's value, each one of known; otherwise parser.error (exit 2) names the
    flag, what it takes and what it got."""
    names = [name for name in value.split(",") if name]
    if not names or any(name not in known for name in names):
        parser.error(f"{flag} takes names of: {', '.join(known)}; got {value!r}")
    return names


def result_stem(result_dir: Path, metadata: dict[str, str]) -> Path:
    """result_dir/<date>-<benchmark>-<device>, the device name as a lowercase slug."""
    device = re.sub(r"[^a-z0-9]+", "-", metadata["device"].lower()).strip("-")
    return result_dir / f"{metadata['date'][:10]}-{metadata['benchmark']}-{device}"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Sequence[Row]) -> str:
    """A plain aligned table for the console."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)) for row in cells)


def markdown_report(title: str, metadata: dict[str, str], sections: Sequence[tuple[str, str]]) -> str:
    """A page: title, a metadata list, then (heading, markdown body) sections."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: `{value}`" for key, value in metadata.items()]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", body.rstrip()]
    return "\n".join(lines) + "\n"


def write_outputs(stem: Path, result: dict[str, Any], markdown: str) -> list[Path]:
    """Writes stem.json and stem.md (directories made as needed); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def launch_table_parser(description: str, shape_names: Sequence[str], repeats: int) -> argparse.ArgumentParser:
    """The flags of a kernel benchmark whose record is write_launch_table's: --shapes (comma-separated, of
    shape_names; the 1B and 8B shapes by default), --repeats (runs a launch's median is taken over), --result-dir."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b",
                        help=f"comma-separated, of: {', '.join(shape_names)}")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--result-dir", type=Path, default=DEFAULT_RESULT_DIR)
    return parser


def write_launch_table(result_dir: Path, benchmark: str, title: str, headers: Sequence[str],
                       rows: Sequence[Row], repeats: int) -> dict[str, Any]:
    """The record of a kernel benchmark that is one table of launches on this process's device: writes
    <date>-<benchmark>-<device>.{json,md}, prints their paths and returns the JSON's content."""
    metadata = run_metadata(benchmark, local_device())
    result = {"metadata": metadata, "repeats": repeats, "headers": list(headers), "rows": [list(r) for r in rows]}
    paths = write_outputs(result_stem(result_dir, metadata), result, markdown_report(
        title, metadata, [("Launches", markdown_table(headers, rows))]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result


def pyplot() -> Any | None:
    """matplotlib's pyplot on a file backend, or None where matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def serving_series(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each path and constraint (in first-seen order), named "path" or "path, constraint" when the runs
    carry several constraints."""
    constraints = {run["structured_output"] for run in runs}
    series: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        name = run["path"] if len(constraints) == 1 else f"{run['path']}, {run['structured_output']}"
        series.setdefault(name, []).append(run)
    return series


def plot_serving(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Throughput per path (direct gRPC, the gateway) against concurrency, each run's latency distributions and share
    of the bound; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    series = serving_series(runs)
    run_labels = [f"{r['path']}\n{r['max_concurrency']}" for r in runs]
    figure, (ax_tput, ax_lat, ax_bound) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, members in series.items():
        levels = [str(r["max_concurrency"]) for r in members]
        ax_tput.plot(levels, [r["output_throughput"] for r in members], marker="o", label=f"{name}: output")
        ax_tput.plot(levels, [r["total_token_throughput"] for r in members], marker="s", linestyle="--",
                     label=f"{name}: total")
    ax_tput.set(xlabel="max concurrency", ylabel="tokens/s", title="Throughput")
    ax_tput.legend()
    positions = range(len(runs))
    ax_lat.boxplot([r["ttfts_ms"] for r in runs], positions=[p - 0.2 for p in positions], widths=0.35,
                   patch_artist=True, boxprops={"facecolor": "#9ecae1"}, showfliers=False)
    ax_lat.boxplot([r["tpots_ms"] for r in runs], positions=[p + 0.2 for p in positions], widths=0.35,
                   patch_artist=True, boxprops={"facecolor": "#fdae6b"}, showfliers=False)
    ax_lat.set_xticks(list(positions), run_labels)
    ax_lat.set_yscale("log")
    ax_lat.set(xlabel="path, max concurrency", ylabel="ms", title="TTFT (blue) and TPOT (orange) per request")
    bounded = [(label, r) for label, r in zip(run_labels, runs, strict=True) if r.get("percent_of_bound") is not None]
    ax_bound.bar([label for label, _ in bounded], [r["percent_of_bound"] for _, r in bounded])
    ax_bound.set(xlabel="path, max concurrency", ylabel="% of roofline bound", title="Output throughput / bound")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_throughput(backends: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Output tokens/s and share of the bound per backend; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    names = [b["backend"] for b in backends]
    figure, (ax_tput, ax_bound) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_tput.bar(names, [b["output_tokens_per_s"] for b in backends])
    ax_tput.set(ylabel="output tokens/s", title="Offline throughput")
    ax_bound.bar(names, [b.get("percent_of_bound") or 0.0 for b in backends])
    ax_bound.set(ylabel="% of roofline bound", title="Throughput / bound")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def positive_int(text: str) -> int:
    """"3" -> 3: an integer of at least 1, for a benchmark's count flags."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"need an integer of at least 1, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """"16,64" -> (16, 64): positive integers, for a benchmark's list flags (--batches, --rows, ...)."""
    values = tuple(int(part) for part in text.split(","))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers separated by commas, got {text!r}")
    return values
