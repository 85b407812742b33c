"""A worker killed mid-stream: the server fails fast and says so. Its worker is an external one (`--worker`), so
nothing restarts it: the open stream ends with UNAVAILABLE, new requests are refused at once, health turns
NOT_SERVING and every block is released."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.control_plane.launch.worker_launcher import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import TEST_CLUSTER_SECRET, control_plane_command, wait_serving, worker_command

pytestmark = pytest.mark.e2e


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "pagedserve.runtime.cli", *command[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                          "PAGEDSERVE_CLUSTER_SECRET": TEST_CLUSTER_SECRET})


@contextmanager
def _serve_with_external_worker(model_dir: Path, log_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """(the public address, the worker process) of a worker and a `serve --worker` pointed at it."""
    worker_address = f"127.0.0.1:{free_loopback_port()}"
    port = free_loopback_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(_spawn(worker_command(model_dir, worker_address), log_dir / "worker.log"))
        wait_serving(worker_address, processes[0], log_dir / "worker.log", timeout_s=120)
        command = control_plane_command(model_dir, worker_address, "127.0.0.1", port)
        processes.append(_spawn(command, log_dir / "control_plane.log"))
        wait_serving(f"127.0.0.1:{port}", processes[1], log_dir / "control_plane.log", timeout_s=120)
        yield f"127.0.0.1:{port}", processes[0]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
    return int(reply.status)


def test_a_killed_worker_fails_its_stream_and_new_requests_at_once_and_turns_health_not_serving(
    stories_dir: Path, tmp_path: Path,
) -> None:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
    request = generation_service_pb2.GenerateRequest(text="Once upon a time", sampling_params=params)
    with _serve_with_external_worker(stories_dir, tmp_path) as (address, worker), \
            grpc.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stream = stub.Generate(request, timeout=30)
        next(stream)
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        stream_failed_after_s = time.monotonic() - killed_at
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stream_failed_after_s < 1.0

        while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - killed_at < 1.0, "health still SERVING a second after the worker died"
            time.sleep(0.01)

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 0.1

        status = stub.GetServerStatus(generation_service_pb2.GetServerStatusRequest(), timeout=5)
        assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)
        assert status.num_total_blocks == 0  # the dead worker's blocks are not offered
