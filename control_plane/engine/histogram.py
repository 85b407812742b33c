"""A Prometheus histogram cheap enough for the engine's hot path, and vLLM's bucket layouts."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that dashboards and alerts written for vLLM read ours alike.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                             120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value inclusive (vLLM's build_1_2_5_buckets): for token counts."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class FastHistogram(Collector):
    """A histogram per label values, observed with one bisect and three additions and no lock (the engine loop
    is its only writer; a scrape may see one observation half-counted). Exported with cumulative `le` buckets.

    Invariant: a series exists from its first observation on; the family is exported (without samples) before.
    """

    def __init__(self, name: str, documentation: str, bounds: Sequence[float], labels: Sequence[str]) -> None:
        self.name, self._documentation = name, documentation
        self._bounds = tuple(bounds)
        self._labels = tuple(labels)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, label_values: tuple[str, ...], value: float, count: int = 1) -> None:
        """Adds count observations of value to the series of label_values (in the order of labels)."""
        series = self._series.get(label_values)
        if series is None:
            series = self._series[label_values] = ([0] * (len(self._bounds) + 1), [0.0])
        counts, total = series
        counts[bisect.bisect_left(self._bounds, value)] += count
        total[0] += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self._documentation, labels=list(self._labels))
        bounds = (*map(_bound, self._bounds), "+Inf")
        for label_values, (counts, total) in list(self._series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(label_values), buckets, total[0])
        yield family


def _bound(value: float) -> str:
    """An `le` label as Prometheus' own client writes it: 0.5 -> "0.5", 16 -> "16.0"."""
    return repr(float(value))
