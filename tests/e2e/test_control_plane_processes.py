"""The control plane's two processes end together: neither keeps serving once the other is gone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.processes import Cluster, running_cluster

pytestmark = pytest.mark.e2e


def _frontend_pid(cluster: Cluster) -> int:
    for line in (cluster.log_dir / "control_plane.log").read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "frontend_started":
            return int(json.loads(line)["pid"])
    raise AssertionError("no frontend_started event in the control plane's log")


def _has_exited_within(pid: int, timeout_s: float) -> bool:
    """True once the process pid is gone (reaped by its parent, or a zombie), False if still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_serve_exits_with_code_1_when_its_frontend_process_dies(stories_dir: Path, tmp_path: Path) -> None:
    with running_cluster(stories_dir, tmp_path) as cluster:
        os.kill(_frontend_pid(cluster), signal.SIGKILL)
        assert cluster.control_plane.wait(timeout=30) == 1


def test_the_frontend_process_exits_when_the_engine_process_is_killed(stories_dir: Path, tmp_path: Path) -> None:
    with running_cluster(stories_dir, tmp_path) as cluster:
        frontend_pid = _frontend_pid(cluster)
        cluster.control_plane.kill()
        cluster.control_plane.wait(timeout=10)
        assert _has_exited_within(frontend_pid, timeout_s=30)
