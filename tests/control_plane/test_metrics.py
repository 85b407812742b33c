"""The engine's latency histograms export cumulative Prometheus buckets, count and sum exactly."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pagedserve.control_plane.engine.metrics import LatencyHistogram


def test_observations_land_in_cumulative_le_buckets_with_exact_count_and_sum() -> None:
    registry = CollectorRegistry()
    histogram = LatencyHistogram("pagedserve:test_seconds", "A test histogram.", "m")
    registry.register(histogram)
    histogram.observe(0.005)  # on a bound: counted in le="0.005"
    histogram.observe(0.05, 2)
    histogram.observe(100.0)  # past every bound: only +Inf

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
