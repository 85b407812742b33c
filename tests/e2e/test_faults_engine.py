"""A worker killed mid-stream: the server fails fast and says so. Its worker is an external one (`--worker`), so
nothing restarts it, and with `--worker-failure-retries 0` its request does not wait for it: the open stream ends
with UNAVAILABLE, new requests are refused at once, health turns NOT_SERVING and every block is released."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import running_cluster

pytestmark = pytest.mark.e2e


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
    return int(reply.status)


def test_a_killed_worker_fails_its_stream_and_new_requests_at_once_and_turns_health_not_serving(
    stories_dir: Path, tmp_path: Path,
) -> None:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
    request = generation_service_pb2.GenerateRequest(text="Once upon a time", sampling_params=params)
    with (running_cluster(stories_dir, tmp_path, serve_args=("--worker-failure-retries", "0")) as cluster,
          grpc.insecure_channel(cluster.address) as channel):
        worker = cluster.worker
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
