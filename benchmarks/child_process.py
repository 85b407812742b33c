"""Stopping the child processes a benchmark starts (a server, a gateway)."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if process has not exited after grace_s; returns once it is reaped."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
