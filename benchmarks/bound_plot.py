"""Serving records side by side against the roofline bound: share of the bound by concurrency, before and after.

    python -m benchmarks.bound_plot BEFORE.json=before AFTER.json=after --rates-from AFTER.json \
        --output benchmarks/results/<date>-bound-by-concurrency-<device>

Each record is a `benchmarks.serving` JSON, named by the label after `=`. A run measured with its bound keeps the
share it recorded; a run of a record made with `--no-bound` gets its bound from the rates of `--rates-from` (a record
that measured the device), computed as the serving benchmark computes it, and the table marks it. Every row also
gives the decode-step bound at its concurrency (the mean over the run's contexts), against which TPOT compares.
Writes OUTPUT.md and, with matplotlib, OUTPUT.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.hardware_bound import (
    HardwareRates,
    Workload,
    decode_cost,
    percent_of_bound,
    server_element_bytes,
    workload_bound_s,
)
from benchmarks.model_shapes import SHAPES

HEADERS = ("record", "shape", "commit", "concurrency", "out tok/s", "TPOT p50 ms", "decode-step bound ms",
           "% of bound", "bound")


def rates_of(record: dict[str, Any]) -> tuple[HardwareRates, bool]:
    """The device a record measured, and whether that includes the FP8 matmul rate (records made before it was
    measured lack it: the bf16 rate stands in, which only records without FP8 weights may use)."""
    hardware = record.get("hardware")
    if hardware is None:
        raise ValueError("the --rates-from record measured no device (it was run with --no-bound)")
    matmul = hardware["matmul_flops_per_s"]
    fp8_matmul = hardware.get("fp8_matmul_flops_per_s")
    rates = HardwareRates(hardware["device_name"], hardware["memory_bandwidth_bytes_per_s"], matmul,
                          matmul if fp8_matmul is None else fp8_matmul)
    return rates, fp8_matmul is not None


def bound_rows(label: str, record: dict[str, Any], rates: HardwareRates, has_fp8_rate: bool) -> list[list[object]]:
    """One row per run of a record: its throughput, TPOT and share of the bound, recorded or computed on rates."""
    config = record["config"]
    shape = SHAPES[config["model_shape"]]
    widths = server_element_bytes(config)
    if widths.layer_linear != widths.model and not has_fp8_rate:
        raise ValueError(f"{label} has FP8 weights: --rates-from must be a record that measured the FP8 matmul rate")
    input_len, output_len = config["random_input_len"], config["random_output_len"]
    contexts = range(input_len + 1, input_len + output_len)
    rows = []
    for run in record["runs"]:
        concurrency = run["max_concurrency"]
        step_s = statistics.fmean(decode_cost(shape, widths, concurrency, c).time_s(rates) for c in contexts)
        share, source = run.get("percent_of_bound"), "recorded"
        if share is None:
            workload = Workload(run["num_prompts"], input_len, output_len, concurrency,
                                config["max_num_batched_tokens"])
            share = percent_of_bound(run["duration_s"], workload_bound_s(shape, widths, rates, workload))
            source = "computed on --rates-from"
        rows.append([label, config["model_shape"], record["metadata"]["commit"], concurrency,
                     round(run["output_throughput"]), round(run["p50_tpot_ms"], 3), round(1e3 * step_s, 3),
                     round(share, 1), source])
    return rows


def plot(rows: Sequence[Sequence[Any]], path: Path) -> Path | None:
    """% of bound against concurrency, one line per record and shape; None without matplotlib."""
    plt = report.pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Sequence[Any]]] = {}
    for row in rows:
        series.setdefault(f"{row[0]}, {row[1]}", []).append(row)
    for name, members in series.items():
        axis.plot([r[3] for r in members], [r[7] for r in members], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set(xlabel="max concurrency", ylabel="% of roofline bound", title="Output throughput / bound", ylim=(0, 100))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serving records' share of the roofline bound by concurrency.")
    p.add_argument("records", nargs="+", help="serving JSON records, each as PATH=LABEL")
    p.add_argument("--rates-from", type=Path, required=True, help="a record that measured the device")
    p.add_argument("--output", type=Path, required=True, help="path stem of the .md and .png")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[list[object]]:
    args = parse_args(argv)
    rates_record = json.loads(args.rates_from.read_text())
    rates, has_fp8_rate = rates_of(rates_record)
    rows: list[list[object]] = []
    for spec in args.records:
        path, _, label = spec.partition("=")
        rows += bound_rows(label or Path(path).stem, json.loads(Path(path).read_text()), rates, has_fp8_rate)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image = plot(rows, args.output.with_suffix(".png"))
    metadata = report.run_metadata("bound-plot", rates.device_name)
    measured = "" if has_fp8_rate else " (that record measured no FP8 matmul rate: the bf16 rate stands in)"
    sections = [("Rates", f"From `{args.rates_from.name}`: {rates}{measured}"),
                ("Runs", report.markdown_table(HEADERS, rows))]
    args.output.with_suffix(".md").write_text(
        report.markdown_report("Share of the roofline bound by concurrency", metadata, sections))
    print(report.text_table(HEADERS, rows))
    if image is not None:
        print(f"wrote {image}")
    return rows


if __name__ == "__main__":
    main()
