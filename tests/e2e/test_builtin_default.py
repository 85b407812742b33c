"""`pagedserve serve` with no model serves the built-in tiny model, starting its own worker, and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest

from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import has_exited_within, wait_serving

pytestmark = pytest.mark.e2e


def test_serve_without_a_model_starts_a_local_worker_and_serves_the_builtin_model(tmp_path) -> None:
    port = free_loopback_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--port", str(port),
               "--kv-cache-memory", "0.05", "--swap-space", "0.01", "--log-format", "json"]
    with log_path.open("wb") as log:  # a group of its own, as a job started at a terminal
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_serving(f"127.0.0.1:{port}", process, log_path, timeout_s=120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            info = stub.GetModelInfo(generation_service_pb2.GetModelInfoRequest())
            params = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
            chunks = list(stub.Generate(generation_service_pb2.GenerateRequest(text="hello", sampling_params=params)))
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert info.model == "pagedserve-tiny-llama" and info.architecture == "LlamaForCausalLM"
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert events[0]["event"] == "using_builtin_model"
    assert process.returncode == 0
    # The worker, in a session of its own, is stopped by serve on its way out.
    worker_pids = [event["pid"] for event in events if event["event"] == "worker_started"]
    assert len(worker_pids) == 1 and has_exited_within(worker_pids[0], timeout_s=15)
