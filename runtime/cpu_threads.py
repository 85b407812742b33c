"""How many CPU threads a worker's torch may use: the cores this process may run on, shared out, never oversubscribed.

torch starts one thread per core, and its threads spin while they wait. A CPU worker that shares its cores with the
control plane's processes (or with other workers) then spends its steps waiting for descheduled threads: on a loaded
2-core machine a decode step of the built-in model took 218 ms with torch's default threads and 6 ms with one.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_worker_threads(num_local_workers: int, cores: int) -> int:
    """Threads of each of num_local_workers workers started beside a control plane on cores cores: one core is left
    to the control plane (its engine and frontend are busy at every step), the rest shared evenly, at least 1."""
    return max(1, (cores - 1) // num_local_workers)
