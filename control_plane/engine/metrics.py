"""Prometheus metrics with vLLM's names under the `pagedserve:` prefix, labelled by model."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pagedserve.control_plane.engine.status import EngineStatus
    from pagedserve.control_plane.scheduling.request import FinishReason

_PREFIX = "pagedserve:"
_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                      10.0, 20.0, 40.0, 80.0)


class LatencyHistogram(Collector):
    """A Prometheus histogram observed on the engine's hot path: one bisect and three additions per
    observation, no lock (the engine loop is its only writer; a scrape may see one observation half-counted)."""

    def __init__(self, name: str, documentation: str, model_name: str) -> None:
        self._name, self._documentation, self._model_name = name, documentation, model_name
        self._bounds = _LATENCY_BUCKETS_S
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([self._model_name], buckets, self._sum)
        yield family


class _StatusCollector(Collector):
    """Reads the engine's counters and gauges at scrape time, so they are never stale or double counted."""

    def __init__(self, model_name: str, status: Callable[[], EngineStatus]) -> None:
        self._model_name = model_name
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        gauges = {
            "num_requests_running": ("Requests being computed.", status.num_requests_running),
            "num_requests_waiting": ("Requests waiting for admission.", status.num_requests_waiting),
            "num_requests_swapped": ("Requests swapped out to CPU memory.", status.num_requests_swapped),
            "kv_cache_usage_perc": (
                "KV cache usage, 1 means 100 percent.",
                status.num_used_blocks / status.num_total_blocks if status.num_total_blocks else 0.0,
            ),
        }
        for name, (documentation, value) in gauges.items():
            gauge = GaugeMetricFamily(_PREFIX + name, documentation, labels=["model_name"])
            gauge.add_metric([self._model_name], value)
            yield gauge
        counters = {
            "num_preemptions": ("Cumulative preemptions.", status.num_preemptions),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", status.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", status.prefix_cache_hits),
            "prompt_tokens": ("Prompt tokens processed.", status.num_prompt_tokens),
            "generation_tokens": ("Tokens generated.", status.num_generation_tokens),
        }
        for name, (documentation, value) in counters.items():
            counter = CounterMetricFamily(_PREFIX + name, documentation, labels=["model_name"])
            counter.add_metric([self._model_name], value)
            yield counter


class EngineMetrics:
    """Latency histograms observed as tokens stream, plus the engine's status read at scrape time."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._model_name = model_name
        self._ttft = LatencyHistogram(_PREFIX + "time_to_first_token_seconds", "Time to first token.", model_name)
        self._itl = LatencyHistogram(_PREFIX + "inter_token_latency_seconds", "Time between output tokens.",
                                     model_name)
        self._e2e = LatencyHistogram(_PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to end.",
                                     model_name)
        for histogram in (self._ttft, self._itl, self._e2e):
            self.registry.register(histogram)
        self._finished = Counter(_PREFIX + "request_success", "Finished completions by finish reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)

    def bind_status(self, status: Callable[[], EngineStatus]) -> None:
        self.registry.register(_StatusCollector(self._model_name, status))

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_itl(self, seconds_per_token: float, num_tokens: int) -> None:
        self._itl.observe(seconds_per_token, num_tokens)

    def request_ended(self, reasons: Sequence[FinishReason | None], e2e_s: float | None) -> None:
        for reason in reasons:
            if reason is not None:
                self._finished.labels(self._model_name, reason.name.lower()).inc()
        if e2e_s is not None:
            self._e2e.observe(e2e_s)

    def serve(self, host: str, port: int) -> None:
        """Starts the /metrics HTTP endpoint in a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
