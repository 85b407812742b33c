"""The serving benchmark end to end on stories260K: a real server process, a concurrency sweep, the JSON record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import serving
from benchmarks.hardware_bound import dtype_bytes, server_element_bytes


def test_sweep_records_every_level_with_vllm_metrics(stories260k_dir: Path, tmp_path: Path) -> None:
    result = serving.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--serve-args", "--device cpu --kv-cache-memory 0.01",
        "--num-prompts", "4", "--random-input-len", "12", "--random-output-len", "5", "--sweep-concurrency", "1,4",
        "--result-dir", str(tmp_path),
    ])
    written = json.loads(next(tmp_path.glob("*-serving-cpu.json")).read_text())
    assert written == result
    assert set(written["metadata"]) == {"benchmark", "commit", "device", "command", "date"}
    assert written["metadata"]["device"] == "cpu"
    runs = written["runs"]
    assert [run["max_concurrency"] for run in runs] == [1, 4]
    for run in runs:
        assert (run["completed"], run["failed"]) == (4, 0)
        assert (run["total_input_tokens"], run["total_output_tokens"]) == (48, 20)
        assert len(run["ttfts_ms"]) == len(run["tpots_ms"]) == 4
        assert run["bound_output_tokens_per_s"] > 0 and run["percent_of_bound"] > 0
        assert run["client_cpu"] > 0  # the client's own CPU share, to tell a run the client limited
        # The host's CPU over the run (the server and client processes at least), to tell a slower host apart.
        assert 0 < run["host_cpu"]["busy_cores"] <= (os.cpu_count() or 1)
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert {f"mean_{name}_ms", f"median_{name}_ms", f"p99_{name}_ms"} <= set(run)
    assert next(tmp_path.glob("*-serving-cpu.md")).read_text().startswith("# Serving benchmark: stories260K")


def test_a_json_schema_on_every_request_runs_beside_none_through_a_real_server(
    stories260k_dir: Path, tmp_path: Path
) -> None:
    result = serving.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--serve-args", "--device cpu --kv-cache-memory 0.01",
        "--num-prompts", "4", "--random-input-len", "12", "--random-output-len", "6", "--max-concurrency", "4",
        "--structured-output", "none,unique-schema", "--no-bound", "--num-warmups", "0", "--result-dir", str(tmp_path),
    ])
    runs = result["runs"]
    assert [run["structured_output"] for run in runs] == ["none", "unique-schema"]
    assert [(run["completed"], run["failed"], run["total_output_tokens"]) for run in runs] == [(4, 0, 24)] * 2


def test_the_bound_counts_the_bytes_the_server_was_started_with() -> None:
    """A server of FP8 weights and FP8 K/V reads half the bytes: its bound may not be the bf16 one (it once was,
    and FP8 runs read as 118 % of their bound)."""
    model = ["--model", "unused"]
    assert server_element_bytes(vars(serving.parse_args(model))) == dtype_bytes("bfloat16")
    fp8 = server_element_bytes(vars(serving.parse_args([*model, "--quantization", "fp8", "--kv-cache-dtype", "fp8"])))
    assert fp8 == dtype_bytes("bfloat16", fp8_weights=True, fp8_kv=True)
    assert (fp8.layer_linear, fp8.kv) == (1, 1)


def test_a_run_split_over_client_processes_counts_the_same_requests_and_tokens(stories260k_dir: Path,
                                                                              tmp_path: Path) -> None:
    result = serving.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--serve-args", "--device cpu --kv-cache-memory 0.01",
        "--num-prompts", "4", "--random-input-len", "12", "--random-output-len", "5", "--max-concurrency", "4",
        "--client-processes", "2", "--no-bound", "--result-dir", str(tmp_path),
    ])
    (run,) = result["runs"]
    assert (run["completed"], run["failed"], run["client_processes"]) == (4, 0, 2)
    assert (run["total_input_tokens"], run["total_output_tokens"]) == (48, 20)
    assert len(run["ttfts_ms"]) == 4 and run["client_cpu"] > 0


@pytest.mark.parametrize("flag", ["--client-processes", "--connections"])
def test_fewer_than_one_client_process_or_connection_is_refused(flag: str) -> None:
    with pytest.raises(SystemExit):
        serving.parse_args(["--model-shape", "llama-3.2-1b", flag, "0"])
