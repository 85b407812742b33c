"""A benchmark's tethered child (CPU, Linux): it runs its module as `python -m` would, and ends soon after the
process that started it, even one killed by SIGKILL, which runs no clean-up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# A stand-in for a benchmark: starts a tethered http.server (a module that serves until stopped), says its pid, waits.
BENCHMARK = """
import subprocess, time
from benchmarks.child_process import tethered_command
child = subprocess.Popen(tethered_command("http.server", ["0", "--bind", "127.0.0.1"]), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(120)
"""


def _is_running(pid: int) -> bool:
    """Whether pid is a live process (an exited one not yet reaped, a zombie, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until_ended(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_tethered_server_ends_soon_after_its_benchmark_is_killed() -> None:
    benchmark = subprocess.Popen([sys.executable, "-c", BENCHMARK], stdout=subprocess.PIPE, cwd=REPO_ROOT)
    assert benchmark.stdout is not None
    child_pid = int(benchmark.stdout.readline())
    try:
        time.sleep(1.0)  # the module is serving, not failed at start
        assert _is_running(child_pid)
        benchmark.kill()
        benchmark.wait()
        assert _wait_until_ended(child_pid, timeout_s=10.0)
    finally:
        if _is_running(child_pid):
            subprocess.run(["kill", "-9", str(child_pid)], check=False)
        benchmark.stdout.close()
