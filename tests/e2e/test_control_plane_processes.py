"""The control plane's two processes end together: neither keeps serving once the other is gone, and a stop by
signal lets the open streams finish first."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams
from pagedserve.v1 import generation_service_pb2
from tests.e2e.processes import Cluster, has_exited_within, running_cluster

pytestmark = pytest.mark.e2e


def _frontend_pid(cluster: Cluster) -> int:
    for line in (cluster.log_dir / "control_plane.log").read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "frontend_started":
            return int(json.loads(line)["pid"])
    raise AssertionError("no frontend_started event in the control plane's log")


def test_serve_exits_with_code_1_when_its_frontend_process_dies(stories_dir: Path, tmp_path: Path) -> None:
    with running_cluster(stories_dir, tmp_path) as cluster:
        os.kill(_frontend_pid(cluster), signal.SIGKILL)
        assert cluster.control_plane.wait(timeout=30) == 1


def test_the_frontend_process_exits_when_the_engine_process_is_killed(stories_dir: Path, tmp_path: Path) -> None:
    with running_cluster(stories_dir, tmp_path) as cluster:
        frontend_pid = _frontend_pid(cluster)
        cluster.control_plane.kill()
        cluster.control_plane.wait(timeout=10)
        assert has_exited_within(frontend_pid, timeout_s=30)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stream_open_when_serve_is_stopped_still_finishes(stories_dir: Path, tmp_path: Path, stop: str) -> None:
    # Ctrl-C at a terminal sends SIGINT to the whole foreground process group; a process manager sends SIGTERM to
    # the process it started. Either way serve drains its frontend, and the stream runs to its last token.
    async def stream_across_the_stop(cluster: Cluster) -> list[generation_service_pb2.GenerateResponse]:
        async with PagedServeClient(cluster.address) as client:
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            chunks: list[generation_service_pb2.GenerateResponse] = []
            async for chunk in client.generate_stream("Once upon a time", params, timeout_s=60):
                if not chunks:
                    pid = cluster.control_plane.pid
                    if stop == "ctrl-c":
                        os.killpg(os.getpgid(pid), signal.SIGINT)
                    else:
                        os.kill(pid, signal.SIGTERM)
                chunks.append(chunk)
            return chunks

    with running_cluster(stories_dir, tmp_path, control_plane_group=True) as cluster:
        chunks = asyncio.run(stream_across_the_stop(cluster))
        assert sum(len(chunk.token_ids) for chunk in chunks) == 200
        assert chunks[-1].finish_reason == generation_service_pb2.FINISH_REASON_LENGTH
        assert cluster.control_plane.wait(timeout=30) == 0
