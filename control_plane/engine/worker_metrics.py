"""The per-worker figures (scheduler state, counters, cache shape), read from the engine at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pagedserve.control_plane.engine.status import WorkerStatus

PREFIX = "pagedserve:"
WORKER_LABELS = ("model_name", "worker_id")

# name: (documentation, figure of a worker's status)
_GAUGES: dict[str, tuple[str, Callable[[WorkerStatus], float]]] = {
    "num_requests_running": ("Requests in model execution batches.", lambda w: w.stats.num_running),
    "num_requests_waiting": ("Requests waiting to be scheduled (new or preempted by recompute).",
                             lambda w: w.stats.num_waiting),
    "num_requests_swapped": ("Requests swapped out to CPU memory.", lambda w: w.stats.num_swapped),
    "kv_cache_usage_perc": (
        "KV-cache usage. 1 means 100 percent usage.",
        lambda w: w.stats.num_used_blocks / w.stats.num_total_blocks if w.stats.num_total_blocks else 0.0,
    ),
    "worker_alive": ("1 while the worker's lane serves, 0 from its failure until it is brought back.",
                     lambda w: float(w.is_alive)),
}
_COUNTERS: dict[str, tuple[str, Callable[[WorkerStatus], float]]] = {
    "num_preemptions": ("Cumulative number of preemptions.", lambda w: w.stats.num_preemptions),
    "prefix_cache_queries": ("Prefix cache queries, in terms of number of queried tokens.",
                             lambda w: w.stats.prefix_cache_queries),
    "prefix_cache_hits": ("Prefix cache hits, in terms of number of cached tokens.",
                          lambda w: w.stats.prefix_cache_hits),
    "prompt_tokens": ("Number of prefill tokens processed.", lambda w: w.stats.num_prompt_tokens),
    "generation_tokens": ("Number of generation tokens processed.", lambda w: w.stats.num_generation_tokens),
}
CACHE_CONFIG_INFO = "cache_config_info"
_CACHE_LABELS = ("block_size", "enable_prefix_caching", "gpu_memory_utilization", "num_gpu_blocks",
                 "num_gpu_blocks_override", "num_cpu_blocks", "kv_cache_memory_bytes", "swap_space_bytes")


class WorkerCollector(Collector):
    """Reads every worker's status at scrape time, so the figures are never stale or double counted: one series
    per worker, labelled model_name and worker_id (sum by model_name for the server's figure)."""

    def __init__(self, model_name: str, workers: Callable[[], Sequence[WorkerStatus]]) -> None:
        self._model_name = model_name
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        workers = list(self._workers())
        for name, (documentation, figure) in _GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + name, documentation, labels=list(WORKER_LABELS))
            for worker in workers:
                gauge.add_metric([self._model_name, worker.worker_id], figure(worker))
            yield gauge
        for name, (documentation, figure) in _COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + name, documentation, labels=list(WORKER_LABELS))
            for worker in workers:
                counter.add_metric([self._model_name, worker.worker_id], figure(worker))
            yield counter
        yield self._cache_config_info(workers)

    def _cache_config_info(self, workers: Sequence[WorkerStatus]) -> Metric:
        """vLLM's info gauge: value 1, the KV cache's configuration and size in its labels."""
        info = GaugeMetricFamily(PREFIX + CACHE_CONFIG_INFO, "Information of the KV cache's configuration.",
                                 labels=[*WORKER_LABELS, *_CACHE_LABELS])
        for worker in workers:
            cache = worker.cache_config
            values = (cache.block_size, cache.enable_prefix_caching, cache.gpu_memory_utilization,
                      worker.stats.num_total_blocks, cache.num_gpu_blocks_override, worker.num_cpu_blocks,
                      cache.kv_cache_memory_bytes, cache.swap_space_bytes)
            info.add_metric([self._model_name, worker.worker_id, *map(str, values)], 1.0)
        return info
