"""The child processes a benchmark starts (a server, a gateway): a server's command tethered to the benchmark, and
stopping either."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def tethered_command(module: str, args: Sequence[str]) -> list[str]:
    """`python -m module args` as a child that exits soon after this process ends, however it ends
    (benchmarks/tethered.py)."""
    return [sys.executable, "-m", "benchmarks.tethered", str(os.getpid()), module, *args]


def stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if process has not exited after grace_s; returns once it is reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
