"""The host's CPU time over a run, from /proc/stat: how many cores' worth of time every process together used, and
how much the hypervisor took from this machine (steal). A constrained step is host-bound, so a run-to-run spread
in its TPOT with the device-bound runs steady asks first whether the host was as fast in both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# The columns of /proc/stat's cpu lines that count time (guest time is already inside user and nice).
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_NOT_BUSY = ("idle", "iowait")


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks of each of FIELDS, summed over the host's CPUs, and how many CPUs that sum covers."""

    ticks: dict[str, int]
    num_cpus: int


def read_cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The host's CPU times now; None where path cannot be read (a host without procfs)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    total = next(line.split() for line in lines if line.startswith("cpu "))
    values = [int(value) for value in total[1:1 + len(FIELDS)]]
    values += [0] * (len(FIELDS) - len(values))  # older kernels have fewer columns
    num_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return CpuTimes(dict(zip(FIELDS, values, strict=True)), num_cpus)


def host_cpu(before: CpuTimes, after: CpuTimes) -> dict[str, float]:
    """Between two readings: busy_cores (the CPUs' time neither idle nor waiting on I/O, in cores), steal_percent
    (of all CPU time: what the hypervisor ran elsewhere while this machine's CPUs wanted to run) and the
    percent of all CPU time each of user and system took."""
    delta = {field: after.ticks[field] - before.ticks[field] for field in FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return {"busy_cores": 0.0, "steal_percent": 0.0, "user_percent": 0.0, "system_percent": 0.0}
    busy = total - sum(delta[field] for field in _NOT_BUSY)
    return {"busy_cores": busy / total * after.num_cpus, "steal_percent": 100.0 * delta["steal"] / total,
            "user_percent": 100.0 * (delta["user"] + delta["nice"]) / total,
            "system_percent": 100.0 * delta["system"] / total}
