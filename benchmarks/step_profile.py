"""Where an engine step's time went: averages from two GetServerStatus (or LLM.status()) snapshots, and the
offline engine's step records grouped by kind of step."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any


def step_profile(before: Any, after: Any) -> dict[str, float]:
    """Per-step averages between two engine status snapshots: control-plane CPU time, worker time, forward
    time and device idle time (ms), and the idle share of the device's busy-plus-idle time."""
    steps = max(after.num_steps - before.num_steps, 1)
    forward_s = after.worker_forward_time_s - before.worker_forward_time_s
    idle_s = after.worker_idle_time_s - before.worker_idle_time_s
    return {
        "steps": float(steps),
        "control_plane_ms_per_step": (after.control_plane_step_time_s - before.control_plane_step_time_s) / steps * 1e3,
        "worker_ms_per_step": (after.worker_step_time_s - before.worker_step_time_s) / steps * 1e3,
        "forward_ms_per_step": forward_s / steps * 1e3,
        "idle_ms_per_step": idle_s / steps * 1e3,
        "idle_fraction": idle_s / (idle_s + forward_s) if idle_s + forward_s > 0 else 0.0,
    }


# Decode steps grouped by batch size: (label, smallest, largest).
_DECODE_GROUPS = (("decode 513+", 513, None), ("decode 257-512", 257, 512), ("decode 65-256", 65, 256),
                  ("decode 1-64", 1, 64))


def _kind(record: Any) -> str:
    if record.num_tokens > record.num_seqs:
        return "with prompt tokens"
    if record.num_tokens == record.num_seqs > 0:
        return next(label for label, low, high in _DECODE_GROUPS
                    if low <= record.num_seqs and (high is None or record.num_seqs <= high))
    return "other"  # a step that computes nothing (it only drops sequences, say)


def step_kinds(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Engine step records (LLM.recent_steps()) grouped into steps with prompt tokens, decode steps by batch
    size, and other steps: per group the number of steps, medians of each time (ms) and of the time since the
    previous result (the first record has none), and the sums (s) of that time, of device time and of idle."""
    periods = [None] + [(b.received_s - a.received_s) * 1e3 for a, b in itertools.pairwise(records)]
    labels = ["with prompt tokens", *(label for label, _, _ in _DECODE_GROUPS), "other"]
    kinds = []
    for label in labels:
        members = [(r, p) for r, p in zip(records, periods, strict=False) if _kind(r) == label]  # [None] if no records
        if not members:
            continue
        known_periods = [p for _, p in members if p is not None]
        kind: dict[str, Any] = {"kind": label, "steps": len(members),
                                "median_seqs": statistics.median(r.num_seqs for r, _ in members),
                                "median_tokens": statistics.median(r.num_tokens for r, _ in members)}
        for field in ("plan_ms", "apply_ms", "worker_host_ms", "device_ms", "idle_ms"):
            kind[f"median_{field}"] = statistics.median(getattr(r, field) for r, _ in members)
        kind["median_period_ms"] = statistics.median(known_periods) if known_periods else None
        kind["sum_period_s"] = sum(known_periods) / 1e3
        kind["sum_device_s"] = sum(r.device_ms for r, _ in members) / 1e3
        kind["sum_idle_s"] = sum(r.idle_ms for r, _ in members) / 1e3
        kinds.append(kind)
    return kinds
