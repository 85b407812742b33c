"""The Grafana dashboard reads only metrics the server exports, and shows every one it exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.status import WorkerStatus
from pagedserve.control_plane.scheduling.stats import SchedulerStats
from tests.deploy.promql import metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pagedserve.json"
# Families the dashboard leaves out on purpose, with the reason (none today).
INTENTIONALLY_ABSENT: dict[str, str] = {}
_SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _exported() -> dict[str, set[str]]:
    """Each family the server registers -> the sample names Prometheus stores for it."""
    metrics = EngineMetrics("m", max_model_len=2048)
    stats = SchedulerStats(0, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    metrics.bind_workers(lambda: [WorkerStatus("w0", True, stats, CacheConfig(), 0)])
    return {family.name: {family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type]}
            for family in metrics.registry.collect()}


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key == "expr" or (key == "query" and node.get("type") == "query")):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


@pytest.fixture(scope="module")
def queries() -> list[str]:
    return list(_queries(json.loads(DASHBOARD.read_text())))


def test_the_parser_finds_metric_names_and_skips_functions_labels_and_keywords() -> None:
    expression = ('histogram_quantile(0.9, sum by (le, worker_id) (rate(a:x_bucket{model_name=~"$m", le!="b"}'
                  '[$__rate_interval]))) / on (worker_id) group_left b_total offset 5m and bool c')
    assert metric_names(expression) == {"a:x_bucket", "b_total", "c"}
    assert metric_names("label_values(a:y{model_name=~\"$model_name\"}, worker_id)") == {"a:y"}
    assert metric_names("label_values(model_name)") == set()


def test_every_query_names_only_metrics_the_server_exports(queries: list[str]) -> None:
    exported = set().union(*_exported().values())
    assert len(queries) > 20
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{sorted(names - exported)} in {query!r} are not exported"


def test_every_exported_family_is_on_the_dashboard_or_listed_as_absent(queries: list[str]) -> None:
    used = set().union(*(metric_names(query) for query in queries))
    missing = {family for family, samples in _exported().items() if not samples & used}
    assert missing == set(INTENTIONALLY_ABSENT)
