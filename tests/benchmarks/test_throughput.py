"""The throughput benchmark on a tiny model: pagedserve and both transformers baselines on the same prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import throughput


def test_every_backend_generates_every_requested_token(stories260k_dir: Path, tmp_path: Path) -> None:
    result = throughput.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.01",
        "--num-prompts", "6", "--input-len", "10", "--output-len", "4", "--hf-num-prompts", "3",
        "--hf-batch-size", "2", "--hf-batch-num-blocks", "8", "--result-dir", str(tmp_path),
    ])
    written = json.loads(next(tmp_path.glob("*-throughput-cpu.json")).read_text())
    assert written == result
    backends = {b["backend"]: b for b in written["backends"]}
    assert list(backends) == ["pagedserve", "hf-generate", "hf-generate-batch"]
    assert [(b["num_requests"], b["prompt_tokens"], b["output_tokens"]) for b in backends.values()] == [
        (6, 60, 24), (3, 30, 12), (3, 30, 12)]
    assert backends["pagedserve"]["pagedserve_speedup"] == 1.0
    hf = backends["hf-generate"]
    assert hf["pagedserve_speedup"] == pytest.approx(
        backends["pagedserve"]["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert all(b["percent_of_bound"] > 0 for b in backends.values())
    # The six prompts of 10 tokens fit one step; the 3 tokens after each first one come in 3 decode steps of 6.
    kinds = {k["kind"]: k for k in backends["pagedserve"]["step_kinds"]}
    prompt, decode = kinds["with prompt tokens"], kinds["decode 1-64"]
    assert (prompt["steps"], prompt["median_seqs"], prompt["median_tokens"]) == (1, 6, 60)
    assert (decode["steps"], decode["median_seqs"], decode["median_tokens"]) == (3, 6, 6)


def test_without_baselines_pagedserve_runs_on_its_own_dummy_weights(stories260k_dir: Path, tmp_path: Path) -> None:
    result = throughput.main([
        "--model", str(stories260k_dir), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "0.01",
        "--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--hf-backends", "", "--no-bound",
        "--result-dir", str(tmp_path),
    ])
    assert [(b["backend"], b["output_tokens"]) for b in result["backends"]] == [("pagedserve", 9)]
    assert result["hardware"] is None and "percent_of_bound" not in result["backends"][0]
