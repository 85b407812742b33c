"""One control plane driving two local workers: requests spread over both, tokens unchanged."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from pagedserve.clients.client import PagedServeClient, SamplingParams
from pagedserve.runtime.port_check import free_loopback_port
from tests.e2e.processes import TEST_DEVICE, wait_serving

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(TEST_DEVICE == "cuda" and torch.cuda.device_count() < 2,
                    reason="two local CUDA workers take a GPU each")
def test_two_local_workers_serve_concurrent_requests_with_the_tokens_one_worker_gives(
    stories_cluster, stories_dir, tmp_path
) -> None:
    prompts = [[1, 403 + i, 407, 261] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    async def run(address: str):
        async with PagedServeClient(address) as client:
            completions = await asyncio.gather(*(client.generate(p, params, timeout_s=60) for p in prompts))
            return [c[0].token_ids for c in completions], await client.model_info()

    port = free_loopback_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--model", str(stories_dir), "--port",
               str(port), "--num-workers", "2", "--device", TEST_DEVICE, "--kv-cache-memory", "0.02",
               "--swap-space", "0.01", "--num-gpu-blocks-override", "256", "--log-format", "json"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", process, log_path, timeout_s=120)
        two_workers, info = asyncio.run(run(f"127.0.0.1:{port}"))
    finally:
        process.terminate()
        process.wait(timeout=30)
    one_worker, _ = asyncio.run(run(stories_cluster.address))
    assert info.num_workers == 2 and info.num_gpu_blocks == 512
    assert two_workers == one_worker
    admitted = [line for line in log_path.read_text().splitlines() if '"request_admitted"' in line]
    assert {'"worker_id": "worker-0"' in line for line in admitted} == {True, False}


def test_serve_exits_at_once_when_a_local_worker_cannot_load_the_model(unloadable_model_dir) -> None:
    command = [sys.executable, "-m", "pagedserve.runtime.cli", "serve", "--model", str(unloadable_model_dir), "--port",
               str(free_loopback_port()), "--device", "cpu"]  # the start timeout stays 600 s
    completed = subprocess.run(command, capture_output=True, timeout=120)
    assert completed.returncode != 0
    assert b"exited with code" in completed.stderr
