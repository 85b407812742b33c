"""The host's CPU time between two /proc/stat readings: busy cores, steal, user and system shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.host_cpu import host_cpu, read_cpu_times


def _stat(tmp_path: Path, name: str, total: str, per_cpu: int = 2) -> Path:
    path = tmp_path / name
    cpus = "".join(f"cpu{i} 0 0 0 0 0 0 0 0 0 0\n" for i in range(per_cpu))
    path.write_text(f"cpu  {total}\n{cpus}intr 1 2 3\nctxt 99\n")
    return path


def test_busy_cores_and_steal_are_shares_of_all_cpu_time_between_two_readings(tmp_path: Path) -> None:
    # Fields: user nice system idle iowait irq softirq steal guest guest_nice.
    before = read_cpu_times(_stat(tmp_path, "a", "100 0 50 800 10 0 0 40 7 0"))
    after = read_cpu_times(_stat(tmp_path, "b", "400 20 130 1000 30 0 10 90 9 0"))
    assert before is not None and after is not None and after.num_cpus == 2

    shares = host_cpu(before, after)

    # Deltas: user 300, nice 20, system 80, idle 200, iowait 20, softirq 10, steal 50: 680 ticks in all, of
    # which 460 neither idle nor waiting on I/O; guest time is inside user already and is not counted again.
    assert shares["busy_cores"] == pytest.approx(460 / 680 * 2)
    assert shares["steal_percent"] == pytest.approx(100 * 50 / 680)
    assert shares["user_percent"] == pytest.approx(100 * 320 / 680)
    assert shares["system_percent"] == pytest.approx(100 * 80 / 680)


def test_an_older_kernel_s_shorter_line_reads_as_zero_steal(tmp_path: Path) -> None:
    before = read_cpu_times(_stat(tmp_path, "a", "10 0 10 80", per_cpu=1))
    after = read_cpu_times(_stat(tmp_path, "b", "30 0 20 150", per_cpu=1))
    assert before is not None and after is not None
    shares = host_cpu(before, after)
    assert shares["steal_percent"] == 0.0
    assert shares["busy_cores"] == pytest.approx(30 / 100)


def test_no_time_between_readings_is_no_load_and_no_procfs_is_no_reading(tmp_path: Path) -> None:
    reading = read_cpu_times(_stat(tmp_path, "a", "1 2 3 4 5 6 7 8"))
    assert reading is not None
    assert host_cpu(reading, reading)["busy_cores"] == 0.0
    assert read_cpu_times(tmp_path / "absent") is None


def test_this_host_s_procfs_reads() -> None:
    reading = read_cpu_times()
    assert reading is not None and reading.num_cpus >= 1 and reading.ticks["idle"] > 0
