"""The engine's metrics: vLLM's buckets, exact request-level figures, one series per worker read at scrape time."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.engine.histogram import FastHistogram, buckets_1_2_5
from pagedserve.control_plane.engine.metrics import EngineMetrics, RequestRecord
from pagedserve.control_plane.engine.status import WorkerStatus
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.scheduling.stats import SchedulerStats


def _value(metrics: EngineMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"pagedserve:{name}", {"model_name": "m", **labels})


def test_observations_land_in_cumulative_le_buckets_with_exact_count_and_sum() -> None:
    registry = CollectorRegistry()
    histogram = FastHistogram("pagedserve:test_seconds", "A test histogram.", (0.001, 0.005, 0.04, 0.06, 80.0),
                              ["model_name"])
    registry.register(histogram)
    histogram.observe(("m",), 0.005)  # on a bound: counted in le="0.005"
    histogram.observe(("m",), 0.05, 2)
    histogram.observe(("m",), 100.0)  # past every bound: only +Inf

    def value(suffix: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"pagedserve:test_seconds{suffix}", {"model_name": "m", **labels})

    assert value("_bucket", le="0.001") == 0
    assert value("_bucket", le="0.005") == 1
    assert value("_bucket", le="0.04") == 1
    assert value("_bucket", le="0.06") == 3
    assert value("_bucket", le="80.0") == 3
    assert value("_bucket", le="+Inf") == 4
    assert value("_count") == 4
    assert value("_sum") == 0.005 + 0.1 + 100.0


def test_token_buckets_are_vllms_1_2_5_series_up_to_max_model_len() -> None:
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def test_a_finished_request_is_observed_in_every_phase_with_exact_times_and_counts() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    record = RequestRecord(arrival_s=10.0, first_scheduled_s=10.5, first_token_s=11.25, last_token_s=13.0,
                           end_s=13.5, num_prompt_tokens=37, num_generation_tokens=120, n=2, max_tokens=64)
    metrics.request_ended([FinishReason.LENGTH, FinishReason.STOP], record)

    assert _value(metrics, "e2e_request_latency_seconds_sum") == 3.5
    assert _value(metrics, "request_queue_time_seconds_sum") == 0.5
    assert _value(metrics, "request_prefill_time_seconds_sum") == 0.75
    assert _value(metrics, "request_decode_time_seconds_sum") == 1.75
    assert _value(metrics, "request_inference_time_seconds_sum") == 2.5
    assert _value(metrics, "request_queue_time_seconds_bucket", le="0.3") == 0
    assert _value(metrics, "request_queue_time_seconds_bucket", le="0.5") == 1
    assert _value(metrics, "request_prompt_tokens_bucket", le="20.0") == 0
    assert _value(metrics, "request_prompt_tokens_bucket", le="50.0") == 1
    assert _value(metrics, "request_prompt_tokens_sum") == 37
    assert _value(metrics, "request_generation_tokens_bucket", le="100.0") == 0
    assert _value(metrics, "request_generation_tokens_bucket", le="200.0") == 1
    assert _value(metrics, "request_params_n_bucket", le="1.0") == 0
    assert _value(metrics, "request_params_n_bucket", le="2.0") == 1
    assert _value(metrics, "request_params_max_tokens_sum") == 64
    assert _value(metrics, "request_success_total", finished_reason="length") == 1
    assert _value(metrics, "request_success_total", finished_reason="stop") == 1


def test_a_request_ended_while_waiting_observes_no_phase_it_never_reached() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    record = RequestRecord(arrival_s=1.0, first_scheduled_s=None, first_token_s=None, last_token_s=None,
                           end_s=31.0, num_prompt_tokens=5, num_generation_tokens=0, n=1, max_tokens=16)
    metrics.request_ended([FinishReason.ABORT], record)

    assert _value(metrics, "e2e_request_latency_seconds_sum") == 30.0
    assert _value(metrics, "request_generation_tokens_bucket", le="1.0") == 1  # zero tokens
    for phase in ("queue", "prefill", "decode", "inference"):
        assert _value(metrics, f"request_{phase}_time_seconds_count") is None, phase
    assert _value(metrics, "request_success_total", finished_reason="abort") == 1


def test_iterations_are_counted_per_worker() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    metrics.observe_iteration("w0", 2048)
    metrics.observe_iteration("w0", 1)
    metrics.observe_iteration("w1", 9)

    assert _value(metrics, "iteration_tokens_total_sum", worker_id="w0") == 2049
    assert _value(metrics, "iteration_tokens_total_bucket", worker_id="w0", le="1.0") == 1
    assert _value(metrics, "iteration_tokens_total_bucket", worker_id="w0", le="1024.0") == 1
    assert _value(metrics, "iteration_tokens_total_bucket", worker_id="w0", le="2048.0") == 2
    assert _value(metrics, "iteration_tokens_total_bucket", worker_id="w1", le="16.0") == 1
    assert _value(metrics, "iteration_tokens_total_bucket", worker_id="w1", le="8.0") == 0


def _worker(worker_id: str, is_alive: bool, running: int, used_blocks: int, preemptions: int) -> WorkerStatus:
    stats = SchedulerStats(num_running=running, num_waiting=running + 1, num_swapped=0, num_used_blocks=used_blocks,
                           num_total_blocks=200, num_preemptions=preemptions, prefix_cache_queries=96,
                           prefix_cache_hits=32, num_prompt_tokens=96, num_generation_tokens=7)
    cache = CacheConfig(block_size=16, num_gpu_blocks_override=200, kv_cache_memory_bytes=4 << 30,
                        swap_space_bytes=4 << 30)  # sized for its worker, as the engine's lanes hold it
    return WorkerStatus(worker_id, is_alive, stats, cache, 64)


def test_each_worker_is_its_own_series_read_at_scrape_time() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    workers = [_worker("w0", True, running=3, used_blocks=50, preemptions=4),
               _worker("w1", False, running=0, used_blocks=0, preemptions=1)]
    metrics.bind_workers(lambda: workers)

    assert _value(metrics, "num_requests_running", worker_id="w0") == 3
    assert _value(metrics, "num_requests_waiting", worker_id="w0") == 4
    assert _value(metrics, "kv_cache_usage_perc", worker_id="w0") == 0.25
    assert _value(metrics, "num_preemptions_total", worker_id="w0") == 4
    assert _value(metrics, "num_preemptions_total", worker_id="w1") == 1
    assert _value(metrics, "prefix_cache_hits_total", worker_id="w1") == 32
    assert _value(metrics, "worker_alive", worker_id="w0") == 1
    assert _value(metrics, "worker_alive", worker_id="w1") == 0
    workers[0] = _worker("w0", True, running=1, used_blocks=100, preemptions=5)
    assert _value(metrics, "kv_cache_usage_perc", worker_id="w0") == 0.5  # read again, never stale
    assert _value(metrics, "num_preemptions_total", worker_id="w0") == 5


def test_cache_config_info_carries_the_cache_shape_in_its_labels() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    metrics.bind_workers(lambda: [_worker("w0", True, running=0, used_blocks=0, preemptions=0)])
    labels = {"worker_id": "w0", "block_size": "16", "enable_prefix_caching": "True",
              "gpu_memory_utilization": "0.9", "num_gpu_blocks": "200", "num_gpu_blocks_override": "200",
              "num_cpu_blocks": "64", "kv_cache_memory_bytes": str(4 << 30), "swap_space_bytes": str(4 << 30)}
    assert _value(metrics, "cache_config_info", **labels) == 1
    assert _value(metrics, "cache_config_info", **{**labels, "num_gpu_blocks": "199"}) is None


@pytest.mark.parametrize("name", ["request_queue_time_seconds", "request_prefill_time_seconds",
                                  "request_decode_time_seconds", "request_inference_time_seconds",
                                  "e2e_request_latency_seconds"])
def test_request_latencies_use_vllms_request_latency_buckets(name: str) -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    metrics.request_ended([FinishReason.STOP], RequestRecord(0.0, 0.0, 0.0, 0.0, 0.0, 1, 1, 1, 1))
    bounds = [s.labels["le"] for f in metrics.registry.collect() if f.name == f"pagedserve:{name}"
              for s in f.samples if s.name.endswith("_bucket")]
    assert bounds == ["0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0", "20.0", "30.0",
                      "40.0", "50.0", "60.0", "120.0", "240.0", "480.0", "960.0", "1920.0", "7680.0", "+Inf"]


def test_every_exported_family_is_documented_in_the_metrics_guide() -> None:
    metrics = EngineMetrics("m", max_model_len=2048)
    metrics.bind_workers(lambda: [_worker("w0", True, running=0, used_blocks=0, preemptions=0)])
    guide = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    suffix = {"counter": "_total", "gauge": "", "histogram": ""}
    families = {family.name + suffix[family.type] for family in metrics.registry.collect()}
    assert len(families) == 25
    for name in families:
        assert f"`{name}`" in guide, name
