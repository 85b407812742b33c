"""More faults of a running `serve`, end to end on stories260K: a worker stopped (SIGSTOP) past `--step-timeout`, a
worker whose step raises, and a SIGTERM that drains streams in flight. Each test counts tokens, blocks, status codes
and log events exactly, and leaves no process behind.

A stopped worker and a worker whose step fails are both external (`--worker`): the supervisor of `serve` reconnects
to them when they serve again, and the same greedy tokens come back. The failing worker runs in this process, so
that its `Worker.finish` can be replaced by one that raises; `serve` reaches it over gRPC like any other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.contract.model_format import DeviceKind
from pagedserve.contract.step import StepResult
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import ClusterSecret
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import (
    TEST_CLUSTER_SECRET,
    TEST_DEVICE,
    _spawn,
    control_plane_command,
    has_exited_within,
    stop_processes,
    wait_serving,
    worker_command,
)
from tests.e2e.test_faults_worker import serving_with_a_local_worker

pytestmark = pytest.mark.e2e

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NUM_BLOCKS = 128  # --num-gpu-blocks-override: every test's requests fit (3 x 31 blocks of 16 tokens at most)
# A small pool on every worker, so that block counts are exact and no test allocates GiBs of KV or swap space.
CACHE_ARGS = ("--num-gpu-blocks-override", str(NUM_BLOCKS), "--swap-space", "0.01")
FAIL_WITH_THE_WORKER = ("--worker-failure-retries", "0")  # a request ends with its worker instead of waiting for it
STEP_TIMEOUT_S = 2.0
SHUTDOWN_TIMEOUT_S = 3.0
LONG_MAX_TOKENS = 480  # with the 5-token prompt, within stories260K's 512 positions; >= 1.5 s of steps on a CPU


def _events(log_path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log's events of that name, in order (a line still being written is skipped)."""
    lines = log_path.read_text().splitlines()
    return [event for line in lines
            if line.startswith("{") and line.endswith("}") and (event := json.loads(line))["event"] == name]


def _log_time(event: dict[str, Any]) -> float:
    """An event's timestamp (ISO 8601, UTC) as time.time() counts."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.01)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
    return int(reply.status)


def _seconds_until_not_serving(channel: grpc.Channel, since: float, limit_s: float) -> float:
    """Polls the public health every 10 ms; the time from since until it said NOT_SERVING (fails after limit_s)."""
    while _health(channel) != NOT_SERVING:
        assert time.monotonic() - since < limit_s, f"health still SERVING {limit_s} s later"
        time.sleep(0.01)
    return time.monotonic() - since


def _request(prompt: str, max_tokens: int, request_id: str = "", ignore_eos: bool = True,
             ) -> generation_service_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return generation_service_pb2.GenerateRequest(text=prompt, request_id=request_id, sampling_params=params)


def _greedy_ids(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: str, max_tokens: int) -> list[int]:
    request = _request(prompt, max_tokens, ignore_eos=False)
    return [token for chunk in stub.Generate(request, timeout=60) for token in chunk.token_ids]


def _status(stub: generation_service_pb2_grpc.GenerationServiceStub) -> tuple[int, int, int, int]:
    """(used blocks, total blocks, running requests, waiting requests)."""
    status = stub.GetServerStatus(generation_service_pb2.GetServerStatusRequest(), timeout=5)
    return (status.num_used_blocks, status.num_total_blocks, status.num_requests_running,
            status.num_requests_waiting)


def _stop_serve(process: subprocess.Popen[bytes], log_path: Path) -> tuple[int, int]:
    """SIGTERM to serve: (its exit code, its frontend's pid)."""
    (started,) = _events(log_path, "frontend_started")
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30), int(started["pid"])


# 1. A worker stopped past the step timeout.


def test_a_stopped_worker_fails_its_stream_after_the_step_timeout_and_serve_reconnects_when_it_resumes(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    """A hung worker (SIGSTOP) answers no step: after --step-timeout 2 its lane dies (UNAVAILABLE, health
    NOT_SERVING, every block released). serve waits for the external worker to serve again, and once it is
    continued (SIGCONT) it drops the lost stream's state, is re-initialised and serves the golden tokens."""
    worker_address = f"127.0.0.1:{free_loopback_port()}"
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    serve_log, worker_log = tmp_path / "serve.log", tmp_path / "worker.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker = _spawn(worker_command(stories_dir, worker_address), worker_log)
        processes.append(worker)
        wait_serving(worker_address, worker, worker_log, timeout_s=120)
        command = control_plane_command(stories_dir, worker_address, "127.0.0.1", port,
                                        extra=("--step-timeout", str(STEP_TIMEOUT_S), *CACHE_ARGS,
                                               *FAIL_WITH_THE_WORKER))
        serve = _spawn(command, serve_log)
        processes.append(serve)
        wait_serving(address, serve, serve_log, timeout_s=120)
        with grpc.insecure_channel(address) as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            stream = stub.Generate(_request(golden["prompt"], LONG_MAX_TOKENS, "stopped"), timeout=30)
            first = next(stream)
            worker.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
            failed_after_s = time.monotonic() - stopped_at
            failed_at = time.monotonic()
            not_serving_after_s = _seconds_until_not_serving(channel, failed_at, limit_s=1.0)
            dead = _status(stub)
            # The worker stays stopped past the start of the supervisor's first try (its backoff after the lane
            # died, from the log; the try's health probes log nothing to poll for): serve must wait for it to serve
            # again rather than revive the lane or give up.
            (scheduled,) = _events(serve_log, "worker_restart_scheduled")
            first_try_at = _log_time(scheduled) + float(scheduled["delay_s"])
            time.sleep(max(0.0, first_try_at + 0.5 - time.time()))
            still_dead = (_health(channel), _events(serve_log, "worker_restarted"),
                          _events(worker_log, "cache_released"))

            worker.send_signal(signal.SIGCONT)  # the worker resumes, finds its step stream gone, and serves again
            _wait_for(lambda: bool(_events(serve_log, "worker_restarted")), 30.0, "reconnection", serve_log)
            wait_serving(address, serve, serve_log, timeout_s=30)
            after = _greedy_ids(stub, golden["prompt"], len(golden["greedy_new_ids"]))
            revived = _status(stub)
        code, frontend_pid = _stop_serve(serve, serve_log)
        worker.terminate()
        worker_code = worker.wait(timeout=15)

        assert list(first.token_ids) == golden["greedy_new_ids"][:len(first.token_ids)]
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert re.fullmatch(r"worker worker-0 did not (answer|take) step \d+ within 2 s", ended.value.details() or "")
        # The watchdog counts from the last step the worker answered (or the oldest's sending), just before SIGSTOP.
        assert STEP_TIMEOUT_S - 0.5 < failed_after_s < STEP_TIMEOUT_S + 1.0
        assert not_serving_after_s < 1.0
        assert dead == (0, 0, 0, 0)  # nothing held, and the dead worker's blocks are not offered
        assert still_dead == (NOT_SERVING, [], [])
        assert (scheduled["attempt"], scheduled["local"]) == (1, False)
        (failure,) = _events(serve_log, "worker_failed")
        assert failure["error"] == ended.value.details()
        assert [request_id.split("@")[0] for request_id in failure["request_ids"]] == ["stopped"]
        assert after == golden["greedy_new_ids"]
        assert revived == (0, NUM_BLOCKS, 0, 0)
        assert [event["worker_id"] for event in _events(serve_log, "worker_restarted")] == ["worker-0"]
        assert _events(worker_log, "control_plane_stream_lost")  # the resumed worker dropped the old stream's state
        assert (code, worker_code) == (0, 0)
        assert has_exited_within(frontend_pid, timeout_s=5.0)
    finally:
        stop_processes(processes)


# 2. A step that raises inside the worker.


class _FinishThatFails:
    """Worker.finish, except that its first call after arm() raises RuntimeError (on the worker's step thread)."""

    def __init__(self, finish: Callable[[LaunchedStep], StepResult]) -> None:
        self._finish = finish
        self._armed = threading.Event()
        self.failed_steps: list[int] = []
        self.failed_at = 0.0  # time.monotonic() of the failure

    def arm(self) -> None:
        self._armed.set()

    def __call__(self, launched: LaunchedStep) -> StepResult:
        if self._armed.is_set():
            self._armed.clear()
            self.failed_steps.append(launched.step_id)
            self.failed_at = time.monotonic()
            raise RuntimeError(f"injected fault while finishing step {launched.step_id}")
        return self._finish(launched)


@contextmanager
def _served_in_this_process(worker: Worker) -> Iterator[str]:
    """Serves worker's WorkerService (with the test cluster's secret) on a free loopback port, from an event loop
    on a thread of its own; yields its address. It logs as a worker process does (JSON lines from INFO, plain
    tracebacks): structlog's default console renderer can spend a second printing a failed step's locals before
    the worker ends the stream."""
    saved = structlog.get_config()
    structlog.configure(processors=[
        structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info, structlog.processors.JSONRenderer(),
    ], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with _serving_on_a_thread(worker) as address:
            yield address
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)


@contextmanager
def _serving_on_a_thread(worker: Worker) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="in-process-worker", daemon=True)
    thread.start()
    try:
        secret = ClusterSecret(TEST_CLUSTER_SECRET)
        server = asyncio.run_coroutine_threadsafe(
            start_server(worker, "127.0.0.1:0", cluster_secret=secret), loop).result(timeout=30)
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_a_step_that_raises_in_the_worker_fails_its_requests_unavailable_and_serve_reconnects(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker answers the failed step with INTERNAL ("internal worker error", its traceback in its own log) and
    drops its state; to the control plane the step stream broke, which is WorkerUnavailableError: the lane's
    requests end with UNAVAILABLE, not INTERNAL, which is kept for failures inside the control plane."""
    worker = Worker.load(WorkerConfig(model_dir=stories_dir, device=DeviceKind(TEST_DEVICE), worker_id="worker-0"))
    finish = _FinishThatFails(worker.finish)
    monkeypatch.setattr(worker, "finish", finish)  # StepPipeline calls worker.finish on the step thread
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    serve_log = tmp_path / "serve.log"
    processes: list[subprocess.Popen[bytes]] = []
    with _served_in_this_process(worker) as worker_address:
        try:
            command = control_plane_command(stories_dir, worker_address, "127.0.0.1", port,
                                            extra=(*CACHE_ARGS, *FAIL_WITH_THE_WORKER))
            serve = _spawn(command, serve_log)
            processes.append(serve)
            wait_serving(address, serve, serve_log, timeout_s=120)
            with grpc.insecure_channel(address) as channel:
                stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
                names = ["a", "b", "c"]
                streams = [stub.Generate(_request(golden["prompt"], LONG_MAX_TOKENS, name), timeout=30)
                           for name in names]
                firsts = [next(stream) for stream in streams]  # all three run on the one worker
                running = _status(stub)
                finish.arm()
                errors: list[grpc.RpcError] = []
                for stream in streams:
                    with pytest.raises(grpc.RpcError) as ended:
                        for _ in stream:
                            pass
                    errors.append(ended.value)
                streams_failed_after_s = time.monotonic() - finish.failed_at
                not_serving_after_s = _seconds_until_not_serving(channel, finish.failed_at, limit_s=1.0)
                dead = _status(stub)

                _wait_for(lambda: bool(_events(serve_log, "worker_restarted")), 30.0, "reconnection", serve_log)
                wait_serving(address, serve, serve_log, timeout_s=30)
                after = _greedy_ids(stub, golden["prompt"], len(golden["greedy_new_ids"]))
                revived = _status(stub)
            code, frontend_pid = _stop_serve(serve, serve_log)
        finally:
            stop_processes(processes)

    for first in firsts:
        assert list(first.token_ids) == golden["greedy_new_ids"][:len(first.token_ids)]
    assert running[0] >= 3 and running[1:] == (NUM_BLOCKS, 3, 0)  # a block each at least, as far as they got
    assert len(finish.failed_steps) == 1
    assert [error.code() for error in errors] == [grpc.StatusCode.UNAVAILABLE] * 3
    assert streams_failed_after_s < 1.0, streams_failed_after_s
    assert not_serving_after_s < 1.0, not_serving_after_s
    assert dead[0] == 0 and dead[2:] == (0, 0)  # no block or request held (total: 0 until the worker is back)
    (failure,) = _events(serve_log, "worker_failed")
    assert failure["worker_id"] == "worker-0"
    assert sorted(request_id.split("@")[0] for request_id in failure["request_ids"]) == names
    assert after == golden["greedy_new_ids"]
    assert revived == (0, NUM_BLOCKS, 0, 0)
    assert [event["worker_id"] for event in _events(serve_log, "worker_restarted")] == ["worker-0"]
    assert code == 0
    assert has_exited_within(frontend_pid, timeout_s=5.0)
    # What the worker said (its status) is what serve logs and the clients read; GrpcWorkerClient.receive() words it.
    # Unless a step written while the worker's status was on its way lost it: grpc's client then ends the call with a
    # status of its own ("Internal error from Core", set when the write fails), and that is what reaches serve.
    said = f"worker at {worker_address} failed: INTERNAL: internal worker error"
    lost = f"worker at {worker_address} failed: INTERNAL: Internal error from Core"
    assert failure["error"] in (said, lost)
    assert [error.details() for error in errors] == [failure["error"]] * 3


# 3. SIGTERM drains the streams in flight.


def test_sigterm_lets_a_short_stream_finish_and_ends_a_long_one_with_abort_after_the_shutdown_timeout(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    """The long stream is held unfinished by stopping (SIGSTOP) the worker once the short one has ended: on a fast
    CPU its 480 tokens could otherwise all come within the 3 s."""
    short_tokens = 32
    with serving_with_a_local_worker(stories_dir, tmp_path, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
                                     *CACHE_ARGS) as serve, grpc.insecure_channel(serve.address) as channel:
        (worker_pid,) = serve.worker_pids()
        frontend_pid = serve.frontend_pid()
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        long_stream = stub.Generate(_request(golden["prompt"], LONG_MAX_TOKENS, "long"), timeout=60)
        long_chunks = [next(long_stream)]
        short_stream = stub.Generate(_request(golden["prompt"], short_tokens, "short"), timeout=60)
        short_chunks = [next(short_stream)]
        serve.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        not_serving_after_s = _seconds_until_not_serving(channel, signalled_at, limit_s=0.5)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(_request(golden["prompt"], 4, "late"), timeout=10))
        short_chunks += list(short_stream)
        short_ended_after_s = time.monotonic() - signalled_at
        try:
            os.kill(worker_pid, signal.SIGSTOP)
            long_chunks += list(long_stream)
            long_ended_after_s = time.monotonic() - signalled_at
        finally:
            os.kill(worker_pid, signal.SIGCONT)
        code = serve.process.wait(timeout=30)

        assert not_serving_after_s < 0.5
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                                     "server is shutting down")
        short_ids = [token for chunk in short_chunks for token in chunk.token_ids]
        assert short_ids == golden["greedy_new_ids"][:short_tokens]
        assert [chunk.finish_reason for chunk in short_chunks] == [0] * (len(short_chunks) - 1) + [
            generation_service_pb2.FINISH_REASON_LENGTH]
        assert [chunk.HasField("usage") for chunk in short_chunks] == [False] * (len(short_chunks) - 1) + [True]
        assert (short_chunks[-1].usage.prompt_tokens, short_chunks[-1].usage.completion_tokens) == (5, short_tokens)
        assert short_ended_after_s < SHUTDOWN_TIMEOUT_S

        long_ids = [token for chunk in long_chunks for token in chunk.token_ids]
        assert short_tokens < len(long_ids) < LONG_MAX_TOKENS
        assert long_ids[:60] == golden["greedy_new_ids"][:len(long_ids[:60])]
        assert [chunk.finish_reason for chunk in long_chunks] == [0] * (len(long_chunks) - 1) + [
            generation_service_pb2.FINISH_REASON_ABORT]
        assert [chunk.HasField("usage") for chunk in long_chunks] == [False] * (len(long_chunks) - 1) + [True]
        assert (long_chunks[-1].usage.prompt_tokens, long_chunks[-1].usage.completion_tokens) == (5, len(long_ids))
        assert SHUTDOWN_TIMEOUT_S - 0.1 < long_ended_after_s < SHUTDOWN_TIMEOUT_S + 0.5

        (draining,) = serve.events("engine_draining")
        assert (draining["num_requests"], draining["timeout_s"]) == (2, SHUTDOWN_TIMEOUT_S)
        (cut,) = serve.events("requests_cut_by_drain")
        assert [request_id.split("@")[0] for request_id in cut["request_ids"]] == ["long"]
        assert code == 0
        assert has_exited_within(worker_pid, timeout_s=5.0)
        assert has_exited_within(frontend_pid, timeout_s=5.0)
