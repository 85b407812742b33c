"""Where an engine step's time went, from two GetServerStatus (or LLM.status()) snapshots."""

from __future__ import annotations

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

