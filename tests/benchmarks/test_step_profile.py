"""Step records grouped by kind: steps with prompt tokens, decode steps by batch size and the rest, exact sums."""

from __future__ import annotations

import pytest

from benchmarks.step_profile import step_kinds
from pagedserve.control_plane.engine.status import StepRecord


def _record(step_id: int, num_seqs: int, num_tokens: int, received_s: float, device_ms: float,
            idle_ms: float) -> StepRecord:
    return StepRecord(step_id, num_seqs, num_tokens, plan_ms=1.0, apply_ms=2.0, received_s=received_s,
                      worker_host_ms=3.0, device_ms=device_ms, idle_ms=idle_ms)


def test_steps_are_grouped_by_kind_with_the_time_since_the_previous_result() -> None:
    records = [
        _record(0, 16, 4096, received_s=1.000, device_ms=60.0, idle_ms=0.0),
        _record(1, 100, 1124, received_s=1.070, device_ms=10.0, idle_ms=1.0),
        _record(2, 600, 600, received_s=1.090, device_ms=15.0, idle_ms=2.0),
        _record(3, 600, 600, received_s=1.106, device_ms=15.0, idle_ms=0.5),
        _record(4, 40, 40, received_s=1.110, device_ms=3.0, idle_ms=0.0),
        _record(5, 0, 0, received_s=1.111, device_ms=0.1, idle_ms=0.0),
    ]

    kinds = {k["kind"]: k for k in step_kinds(records)}

    assert list(kinds) == ["with prompt tokens", "decode 513+", "decode 1-64", "other"]
    prompt = kinds["with prompt tokens"]
    assert (prompt["steps"], prompt["median_tokens"]) == (2, 2610)
    assert prompt["median_period_ms"] == pytest.approx(70.0)  # the first record has no period
    assert prompt["sum_period_s"] == pytest.approx(0.070)
    decode = kinds["decode 513+"]
    assert (decode["steps"], decode["median_seqs"], decode["median_device_ms"]) == (2, 600, 15.0)
    assert decode["median_period_ms"] == pytest.approx(18.0)
    assert decode["sum_period_s"] == pytest.approx(0.036)
    assert decode["sum_device_s"] == pytest.approx(0.030)
    assert decode["sum_idle_s"] == pytest.approx(0.0025)
    assert kinds["decode 1-64"]["median_plan_ms"] == 1.0
    assert (kinds["other"]["steps"], kinds["other"]["median_seqs"]) == (1, 0)  # a step that only drops
