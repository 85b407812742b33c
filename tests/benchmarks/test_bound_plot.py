"""Serving records against the bound: recorded shares kept, missing ones computed on another record's rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bound_plot
from benchmarks.hardware_bound import HardwareRates, Workload, dtype_bytes, percent_of_bound, workload_bound_s
from benchmarks.model_shapes import SHAPES

RATES = {"device_name": "test", "memory_bandwidth_bytes_per_s": 4e12, "matmul_flops_per_s": 7e14}


def _record(commit: str, runs: list[dict[str, Any]], hardware: dict[str, Any] | None = None,
            **config: object) -> dict[str, Any]:
    base = {"model_shape": "llama-3.2-1b", "dtype": "bfloat16", "random_input_len": 1024, "random_output_len": 128,
            "max_num_batched_tokens": 2048}
    return {"metadata": {"commit": commit}, "config": base | config, "hardware": hardware, "runs": runs}


def _run(concurrency: int, duration_s: float, **fields: object) -> dict[str, Any]:
    return {"max_concurrency": concurrency, "num_prompts": 4 * concurrency, "duration_s": duration_s,
            "output_throughput": 512 * concurrency / duration_s, "p50_tpot_ms": 1.5} | fields


def test_a_run_without_a_bound_gets_it_from_the_rates_record_and_a_recorded_share_is_kept(tmp_path: Path) -> None:
    before = tmp_path / "before.json"
    after = tmp_path / "after.json"
    before.write_text(json.dumps(_record("aaaaaaa", [_run(1, 0.9), _run(64, 5.0)])))
    after.write_text(json.dumps(_record("bbbbbbb", [_run(1, 0.7, percent_of_bound=51.3)], hardware=RATES)))

    rows = bound_plot.main([f"{before}=before", f"{after}=after", "--rates-from", str(after),
                            "--output", str(tmp_path / "out" / "plot")])

    rates = HardwareRates("test", 4e12, 7e14, 7e14)
    expected = percent_of_bound(5.0, workload_bound_s(SHAPES["llama-3.2-1b"], dtype_bytes("bfloat16"), rates,
                                                       Workload(256, 1024, 128, 64, 2048)))
    assert [(r[0], r[2], r[3], r[8]) for r in rows] == [
        ("before", "aaaaaaa", 1, "computed on --rates-from"), ("before", "aaaaaaa", 64, "computed on --rates-from"),
        ("after", "bbbbbbb", 1, "recorded")]
    assert rows[1][7] == round(expected, 1)
    assert rows[2][7] == 51.3
    assert "| before | llama-3.2-1b | aaaaaaa | 64 |" in (tmp_path / "out" / "plot.md").read_text()


def test_fp8_weights_are_refused_against_rates_that_lack_the_fp8_matmul_rate(tmp_path: Path) -> None:
    fp8 = _record("ccccccc", [_run(1, 0.5)], quantization="fp8")

    with pytest.raises(ValueError, match="FP8 matmul rate"):
        bound_plot.bound_rows("fp8", fp8, *bound_plot.rates_of(_record("d", [], hardware=RATES)))

    rates, has_fp8_rate = bound_plot.rates_of(_record("d", [], hardware=RATES | {"fp8_matmul_flops_per_s": 1.4e15}))
    assert has_fp8_rate and rates.fp8_matmul_flops_per_s == 1.4e15
    assert bound_plot.bound_rows("fp8", fp8, rates, has_fp8_rate)[0][8] == "computed on --rates-from"
