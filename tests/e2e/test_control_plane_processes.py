"""The control plane's two processes end together: neither keeps serving once the other is gone, and a stop by
signal lets the open streams finish first."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import Cluster, has_exited_within, running_cluster

pytestmark = pytest.mark.e2e


def _events(cluster: Cluster, event: str) -> list[dict[str, Any]]:
    lines = (cluster.log_dir / "control_plane.log").read_text().splitlines()
    return [record for line in lines if line.startswith("{") and (record := json.loads(line)).get("event") == event]


def _listening_frontends(cluster: Cluster, count: int, timeout_s: float) -> set[tuple[int, str]]:
    """(frontend index, address) of each server_listening event, once count of them are in the log or timeout_s
    has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        listening = {(record["frontend_index"], record["address"]) for record in _events(cluster, "server_listening")}
        if len(listening) >= count or time.monotonic() > deadline:
            return listening
        time.sleep(0.05)


def _frontend_pid(cluster: Cluster, index: int = 0) -> int:
    started = [record for record in _events(cluster, "frontend_started") if record["index"] == index]
    assert started, f"no frontend_started event of frontend {index} in the control plane's log"
    return int(started[0]["pid"])


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


def test_several_frontend_processes_share_the_public_port_and_stream_alike(stories_dir: Path, tmp_path: Path) -> None:
    # Each client on a connection of its own (a local subchannel pool), so the kernel spreads them over the
    # frontends that listen on the port; every one streams what greedy decoding of the prompt gives.
    async def generate_on_own_connection(address: str) -> list[int]:
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            request = generation_service_pb2.GenerateRequest(
                text="Once upon a time", sampling_params=common_pb2.SamplingParams(temperature=0.0, max_tokens=12))
            return [token async for chunk in stub.Generate(request, timeout=60) for token in chunk.token_ids]

    async def eight_clients(address: str) -> list[list[int]]:
        return await asyncio.gather(*(generate_on_own_connection(address) for _ in range(8)))

    with running_cluster(stories_dir, tmp_path, serve_args=["--frontend-processes", "2"]) as cluster:
        # The port answers once one frontend listens; the other may still be starting.
        listening = _listening_frontends(cluster, count=2, timeout_s=30.0)
        outputs = asyncio.run(eight_clients(cluster.address))
        assert listening == {(0, cluster.address), (1, cluster.address)}
        assert len(outputs[0]) == 12 and all(output == outputs[0] for output in outputs)
        os.kill(_frontend_pid(cluster, 1), signal.SIGKILL)  # any frontend's death stops the server
        assert cluster.control_plane.wait(timeout=30) == 1
