"""The control plane serves without torch, CuPy or safetensors installed, as its image has none of them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import (
    TEST_CLUSTER_SECRET,
    control_plane_command,
    stop_processes,
    wait_serving,
    worker_command,
)

pytestmark = pytest.mark.e2e
HIDING = Path(__file__).resolve().parent / "without_torch"


@contextmanager
def _serving(command: list[str], address: str, log: Path, hide_torch: bool) -> Iterator[None]:
    env = {**os.environ, "PAGEDSERVE_CLUSTER_SECRET": TEST_CLUSTER_SECRET}
    if hide_torch:
        env["PYTHONPATH"] = os.pathsep.join([str(HIDING), os.environ.get("PYTHONPATH", "")])
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "pagedserve.runtime.cli", *command[1:]],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(address, process, log, timeout_s=60)
        yield
    finally:
        stop_processes([process])


def test_serve_runs_and_generates_the_golden_tokens_with_torch_hidden(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    worker_address, address = f"127.0.0.1:{free_loopback_port()}", f"127.0.0.1:{free_loopback_port()}"
    control_log = tmp_path / "control_plane.log"
    serve = control_plane_command(stories_dir, worker_address, "127.0.0.1", int(address.rsplit(":", 1)[1]))
    with _serving(worker_command(stories_dir, worker_address), worker_address, tmp_path / "worker.log", False), \
            _serving(serve, address, control_log, hide_torch=True), grpc.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
        request = generation_service_pb2.GenerateRequest(text=golden["prompt"], sampling_params=params)
        tokens = [t for reply in stub.Generate(request, timeout=30) for t in reply.token_ids]
    assert tokens == golden["greedy_new_ids"][:8]
    assert "PyTorch was not found" in control_log.read_text()  # transformers saw no torch: the hiding works
