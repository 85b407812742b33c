"""A benchmark's tethered child (CPU, Linux): it runs its module as `python -m` would, and ends soon after the
process that started it, even one killed by SIGKILL, which runs no clean-up."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# A stand-in for a benchmark: starts a tethered http.server (a module that serves until stopped), waits for its
# "Serving HTTP on ..." line, says its pid, then waits itself.
BENCHMARK = """
import os, subprocess, time
from benchmarks.child_process import tethered_command
child = subprocess.Popen(tethered_command("http.server", ["0", "--bind", "127.0.0.1"]), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True)
print(child.stdout.readline().strip(), flush=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_tethered_server_ends_soon_after_its_benchmark_is_killed() -> None:
    benchmark = subprocess.Popen([sys.executable, "-c", BENCHMARK], stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
    assert benchmark.stdout is not None
    try:
        assert benchmark.stdout.readline().startswith("Serving HTTP on 127.0.0.1")  # the module runs as with -m
        child = os.pidfd_open(int(benchmark.stdout.readline()))  # readable once the child has exited
    finally:
        benchmark.stdout.close()
    try:
        assert select.select([child], [], [], 0)[0] == []
        benchmark.kill()
        benchmark.wait()
        ended, _, _ = select.select([child], [], [], 10.0)
        if not ended:
            signal.pidfd_send_signal(child, signal.SIGKILL)
        assert ended, "the tethered server outlived its benchmark by 10 s"
    finally:
        os.close(child)
        if benchmark.poll() is None:
            benchmark.kill()
            benchmark.wait()
