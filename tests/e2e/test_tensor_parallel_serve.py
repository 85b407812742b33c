"""`serve --tensor-parallel-size 2`: one worker made of two processes serves the golden greedy tokens; killing one
rank fails the group's requests with UNAVAILABLE, turns health NOT_SERVING, and the whole group is restarted."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.clients.health_check import is_serving
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import has_exited_within, wait_serving
from tests.e2e.test_faults_worker import _greedy_ids, _wait_for, serving_with_a_local_worker

pytestmark = pytest.mark.e2e


def _stream_until_failure(address: str, prompt: str, on_first_chunk: Any) -> tuple[int, grpc.StatusCode | None]:
    """Streams a long completion, calls on_first_chunk() after its first chunk; (chunks read, the status that ended
    the stream, None if it finished)."""
    request = generation_service_pb2.GenerateRequest(text=prompt, sampling_params=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=400, ignore_eos=True))
    num_chunks = 0
    with grpc.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        try:
            for _ in stub.Generate(request, timeout=60):
                num_chunks += 1
                if num_chunks == 1:
                    on_first_chunk()
        except grpc.RpcError as error:
            return num_chunks, error.code()
    return num_chunks, None


def test_a_tensor_parallel_group_serves_golden_tokens_and_is_restarted_whole_when_one_rank_dies(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    expected = golden["greedy_new_ids"][:8]
    with serving_with_a_local_worker(stories_dir, tmp_path, "--tensor-parallel-size", "2") as serve:
        before = _greedy_ids(serve.address, golden["prompt"], 8)
        leader_pid, follower_pid = serve.worker_pids()
        num_chunks, code = _stream_until_failure(serve.address, golden["prompt"],
                                                 lambda: os.kill(follower_pid, signal.SIGKILL))
        _wait_for(lambda: not is_serving(serve.address, timeout_s=1.0), 5.0, "health NOT_SERVING", serve)
        leader_exited = has_exited_within(leader_pid, timeout_s=5.0)
        _wait_for(lambda: len(serve.worker_pids()) == 4, 30.0, "a restarted group", serve)
        wait_serving(serve.address, serve.process, serve.log_path, timeout_s=60)
        after = _greedy_ids(serve.address, golden["prompt"], 8)

        assert (before, after) == (expected, expected)
        assert code is grpc.StatusCode.UNAVAILABLE and num_chunks < 400
        assert leader_exited
        assert [event["tp_rank"] for event in serve.events("worker_started")] == [0, 1, 0, 1]
        assert [event["worker_id"] for event in serve.events("worker_restarted")] == ["worker-0"]
