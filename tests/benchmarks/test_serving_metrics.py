"""Serving metrics from chunk arrival times, as vLLM defines them."""

from __future__ import annotations

import pytest

from benchmarks.serving_metrics import RequestRecord, compute_metrics


def _record() -> RequestRecord:
    # Sent at 10 s; chunks of 1, 1 and 2 tokens at 11, 11.5 and 12.5 s.
    return RequestRecord(prompt_len=5, start_s=10.0, chunk_times_s=[11.0, 11.5, 12.5], chunk_num_tokens=[1, 1, 2])


def test_a_chunk_of_several_tokens_shares_its_gap_evenly() -> None:
    assert _record().itls_s() == [0.5, 0.5, 0.5]


def test_ttft_and_tpot_follow_vllm() -> None:
    record = _record()
    assert (record.ttft_s, record.latency_s, record.tpot_s) == (1.0, 2.5, 0.5)


def test_single_token_completion_has_no_tpot() -> None:
    assert RequestRecord(3, 0.0, [0.25], [1]).tpot_s is None


def test_metrics_count_only_successful_requests() -> None:
    failed = RequestRecord(prompt_len=7, start_s=10.0, error="UNAVAILABLE: worker gone")
    metrics = compute_metrics([_record(), failed], duration_s=2.0)
    assert (metrics["completed"], metrics["failed"], metrics["errors"]) == (1, 1, ["UNAVAILABLE: worker gone"])
    assert (metrics["total_input_tokens"], metrics["total_output_tokens"]) == (5, 4)
    assert (metrics["request_throughput"], metrics["output_throughput"], metrics["total_token_throughput"]) == (
        0.5, 2.0, 4.5)
    assert metrics["mean_ttft_ms"] == 1000.0
    assert metrics["median_itl_ms"] == metrics["p99_itl_ms"] == pytest.approx(500.0)
    assert metrics["e2els_ms"] == [2500.0]
