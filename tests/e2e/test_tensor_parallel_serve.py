"""`serve --tensor-parallel-size 2`: one worker made of two processes serves the golden greedy tokens; a rank that
dies (SIGKILL) or hangs (SIGSTOP) turns health NOT_SERVING and the whole group is restarted; its requests end with
UNAVAILABLE under `--worker-failure-retries 0`, and by default wait for the restart and go on with the same tokens."""

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
from tests.e2e.test_faults_worker import LocalServe, _greedy_ids, _wait_for, serving_with_a_local_worker

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


def _fail_a_rank_mid_stream(serve: LocalServe, fault: signal.Signals,
                            prompt: str) -> tuple[int, grpc.StatusCode | None, bool]:
    """Sends fault to the newest group's rank 1 after the first chunk of a long stream; waits for health NOT_SERVING
    and for the group to come back. (chunks the stream got, its status, whether that group's leader exited)."""
    # Counted before the fault: a restart can land while the leader's exit is awaited below (a hung follower's
    # leader exits only when the restart kills the group).
    num_started = len(serve.worker_pids())
    leader_pid, follower_pid = serve.worker_pids()[-2:]
    num_chunks, code = _stream_until_failure(serve.address, prompt, lambda: os.kill(follower_pid, fault))
    _wait_for(lambda: not is_serving(serve.address, timeout_s=1.0), 5.0, "health NOT_SERVING", serve)
    leader_exited = has_exited_within(leader_pid, timeout_s=5.0)
    _wait_for(lambda: len(serve.worker_pids()) == num_started + 2, 30.0, "a restarted group", serve)
    wait_serving(serve.address, serve.process, serve.log_path, timeout_s=60)
    return num_chunks, code, leader_exited


def test_a_tensor_parallel_group_serves_golden_tokens_and_is_restarted_whole_when_a_rank_dies_or_hangs(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    expected = golden["greedy_new_ids"][:8]
    with serving_with_a_local_worker(stories_dir, tmp_path, "--tensor-parallel-size", "2",
                                     "--step-timeout", "3", "--worker-failure-retries", "0") as serve:
        first = _greedy_ids(serve.address, golden["prompt"], 8)
        killed = _fail_a_rank_mid_stream(serve, signal.SIGKILL, golden["prompt"])
        second = _greedy_ids(serve.address, golden["prompt"], 8)
        stopped = _fail_a_rank_mid_stream(serve, signal.SIGSTOP, golden["prompt"])  # hung: the step timeout
        third = _greedy_ids(serve.address, golden["prompt"], 8)

        assert (first, second, third) == (expected, expected, expected)
        # A dead follower ends its leader at once; a hung one is killed with its group by the restart.
        assert killed[1:] == (grpc.StatusCode.UNAVAILABLE, True) and killed[0] < 400
        assert stopped[1] is grpc.StatusCode.UNAVAILABLE and stopped[0] < 400
        assert [event["tp_rank"] for event in serve.events("worker_started")] == [0, 1] * 3
        assert [event["worker_id"] for event in serve.events("worker_restarted")] == ["worker-0"] * 2


def test_a_stream_rides_through_the_death_of_a_rank_with_the_tokens_it_would_have_had(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    """With the default --worker-failure-retries, the request waits for the whole group's restart and is computed
    again there: the stream goes on with exactly the greedy tokens of a run without the fault."""
    request = generation_service_pb2.GenerateRequest(text=golden["prompt"], sampling_params=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=400, ignore_eos=True))
    with (serving_with_a_local_worker(stories_dir, tmp_path, "--tensor-parallel-size", "2") as serve,
          grpc.insecure_channel(serve.address) as channel):
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        reference = [token for chunk in stub.Generate(request, timeout=120) for token in chunk.token_ids]
        stream = iter(stub.Generate(request, timeout=120))
        first = next(stream)
        os.kill(serve.worker_pids()[1], signal.SIGKILL)
        rest = [token for chunk in stream for token in chunk.token_ids]
        resumed = serve.events("request_resumed")

    assert len(first.token_ids) < 400  # the fault came mid-stream
    assert [*first.token_ids, *rest] == reference
    assert [(event["failed_worker_id"], event["worker_id"]) for event in resumed] == [("worker-0", "worker-0")]
