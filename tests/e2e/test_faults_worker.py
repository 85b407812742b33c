"""`serve` with local workers when a process dies: a killed worker is restarted and serves the same greedy tokens,
`--worker-restart never` makes serve exit non-zero instead, and a killed serve leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.clients.health_check import is_serving
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.processes import (
    TEST_DEVICE,
    _spawn,
    control_plane_command,
    has_exited_within,
    stop_processes,
    wait_serving,
    worker_command,
)

pytestmark = pytest.mark.e2e


class LocalServe:
    """A `pagedserve serve` process with its own local worker, and what its log says it started."""

    def __init__(self, process: subprocess.Popen[bytes], address: str, log_path: Path) -> None:
        self.process = process
        self.address = address
        self.log_path = log_path

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log's events called name. serve and its workers share the log and may write lines at the same moment
        (one object's newline after the next object), so each line is read as a run of JSON objects."""
        decoder, events = json.JSONDecoder(), []
        for line in self.log_path.read_text().splitlines():
            position = 0
            while line.startswith("{", position):
                event, position = decoder.raw_decode(line, position)
                events.append(event)
        return [event for event in events if event["event"] == name]

    def worker_pids(self) -> list[int]:
        return [int(event["pid"]) for event in self.events("worker_started")]

    def frontend_pid(self) -> int:
        (event,) = self.events("frontend_started")
        return int(event["pid"])


@contextmanager
def serving_with_a_local_worker(model_dir: Path, log_dir: Path, *extra: str) -> Iterator[LocalServe]:
    """serve on a free loopback port, starting its own worker; SIGKILLed on exit if still running."""
    address = f"127.0.0.1:{free_loopback_port()}"
    log_path = log_dir / "serve.log"
    command = ["pagedserve", "serve", "--model", str(model_dir), "--device", TEST_DEVICE, "--host", "127.0.0.1",
               "--port", address.rpartition(":")[2], "--log-format", "json", *extra]
    process = _spawn(command, log_path)
    serve = LocalServe(process, address, log_path)
    try:
        wait_serving(address, process, log_path, timeout_s=120)
        yield serve
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in serve.worker_pids():  # should be gone already; never leave one behind a failed test
            if not has_exited_within(pid, timeout_s=5):
                os.kill(pid, signal.SIGKILL)


def _greedy_ids(address: str, prompt: str, max_tokens: int) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        request = generation_service_pb2.GenerateRequest(
            text=prompt, sampling_params=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
        return [token for chunk in stub.Generate(request, timeout=60) for token in chunk.token_ids]


def _wait_for(condition: Any, timeout_s: float, what: str, serve: LocalServe) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s:\n{serve.log_path.read_text()[-4000:]}")
        time.sleep(0.05)


def test_serve_restarts_a_killed_worker_and_serves_the_same_greedy_tokens(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    expected = golden["greedy_new_ids"][:8]
    with serving_with_a_local_worker(stories_dir, tmp_path) as serve:
        before = _greedy_ids(serve.address, golden["prompt"], 8)
        (first_pid,) = serve.worker_pids()
        os.kill(first_pid, signal.SIGKILL)
        # The restart waits 1 s (backoff) and the new worker loads for longer: the outage is visible.
        _wait_for(lambda: not is_serving(serve.address, timeout_s=1.0), 5.0, "health NOT_SERVING", serve)
        _wait_for(lambda: len(serve.worker_pids()) == 2, 30.0, "a second worker", serve)
        wait_serving(serve.address, serve.process, serve.log_path, timeout_s=60)
        after = _greedy_ids(serve.address, golden["prompt"], 8)
        second_pid = serve.worker_pids()[1]
        frontend_pid = serve.frontend_pid()
        serve.process.send_signal(signal.SIGTERM)
        code = serve.process.wait(timeout=60)

        assert (before, after) == (expected, expected)
        assert [event["worker_id"] for event in serve.events("worker_restarted")] == ["worker-0"]
        assert code == 0
        assert has_exited_within(second_pid, timeout_s=5) and has_exited_within(frontend_pid, timeout_s=5)


def _greedy_stream(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt: str,
                   max_tokens: int) -> Iterator[generation_service_pb2.GenerateResponse]:
    request = generation_service_pb2.GenerateRequest(text=prompt, sampling_params=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return iter(stub.Generate(request, timeout=120))


def test_a_stream_rides_through_the_kill_of_its_only_worker_with_the_tokens_it_would_have_had(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    """The request waits for serve's restart of its worker (health NOT_SERVING meanwhile), is computed again there
    from its prompt and the tokens already sent, and its stream goes on: no token lost, none twice, each the one a
    run without the kill gives."""
    max_tokens = 400
    with serving_with_a_local_worker(stories_dir, tmp_path) as serve, grpc.insecure_channel(serve.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        reference = [token for chunk in _greedy_stream(stub, golden["prompt"], max_tokens) for token in chunk.token_ids]
        stream = _greedy_stream(stub, golden["prompt"], max_tokens)
        first = next(stream)
        (worker_pid,) = serve.worker_pids()
        os.kill(worker_pid, signal.SIGKILL)
        _wait_for(lambda: not is_serving(serve.address, timeout_s=1.0), 5.0, "health NOT_SERVING", serve)
        rest = [token for chunk in stream for token in chunk.token_ids]
        waits, resumed = serve.events("request_waits_for_a_worker"), serve.events("request_resumed")

    assert len(first.token_ids) < max_tokens  # the kill came mid-stream
    assert [*first.token_ids, *rest] == reference
    assert [event["failed_worker_id"] for event in waits] == ["worker-0"]
    assert [(event["failed_worker_id"], event["worker_id"]) for event in resumed] == [("worker-0", "worker-0")]


def test_a_worker_whose_port_was_taken_while_it_was_down_comes_back_on_another(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    expected = golden["greedy_new_ids"][:8]
    with serving_with_a_local_worker(stories_dir, tmp_path) as serve:
        (started,) = serve.events("worker_started")
        host, _, port = started["address"].rpartition(":")
        os.kill(int(started["pid"]), signal.SIGKILL)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            _wait_for(lambda: _binds(squatter, host, int(port)), 5.0, "the dead worker's port free", serve)
            squatter.listen()
            _wait_for(lambda: len(serve.worker_pids()) == 2, 30.0, "a second worker", serve)
            wait_serving(serve.address, serve.process, serve.log_path, timeout_s=60)
            after = _greedy_ids(serve.address, golden["prompt"], 8)
        restarted = serve.events("worker_started")[1]

    assert after == expected
    assert restarted["address"] != started["address"]
    assert [event["worker_id"] for event in serve.events("worker_restarted")] == ["worker-0"]
    assert serve.events("worker_restart_failed") == []


def _binds(sock: socket.socket, host: str, port: int) -> bool:
    try:
        sock.bind((host, port))
    except OSError:
        return False
    return True


def test_a_killed_serve_leaves_no_worker_or_frontend_behind(stories_dir: Path, tmp_path: Path) -> None:
    with serving_with_a_local_worker(stories_dir, tmp_path) as serve:
        (worker_pid,) = serve.worker_pids()
        frontend_pid = serve.frontend_pid()
        serve.process.kill()
        serve.process.wait(timeout=10)

        assert has_exited_within(worker_pid, timeout_s=2.0)
        assert has_exited_within(frontend_pid, timeout_s=2.0)


def test_serve_with_worker_restart_never_exits_non_zero_when_its_worker_dies(
    stories_dir: Path, tmp_path: Path,
) -> None:
    with serving_with_a_local_worker(stories_dir, tmp_path, "--worker-restart", "never") as serve:
        (worker_pid,) = serve.worker_pids()
        frontend_pid = serve.frontend_pid()
        os.kill(worker_pid, signal.SIGKILL)
        code = serve.process.wait(timeout=30)

        assert code == 1
        assert serve.events("worker_lane_abandoned")[0]["reason"] == "--worker-restart never"
        assert serve.worker_pids() == [worker_pid]  # never restarted
        assert has_exited_within(frontend_pid, timeout_s=2.0)


def test_serve_reconnects_to_an_external_worker_that_comes_back(
    stories_dir: Path, golden: dict[str, Any], tmp_path: Path,
) -> None:
    expected = golden["greedy_new_ids"][:8]
    worker_address = f"127.0.0.1:{free_loopback_port()}"
    address = f"127.0.0.1:{free_loopback_port()}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(_spawn(worker_command(stories_dir, worker_address), tmp_path / "worker.log"))
        wait_serving(worker_address, processes[-1], tmp_path / "worker.log", timeout_s=120)
        command = control_plane_command(stories_dir, worker_address, "127.0.0.1", int(address.rpartition(":")[2]))
        serve = LocalServe(_spawn(command, tmp_path / "serve.log"), address, tmp_path / "serve.log")
        processes.append(serve.process)
        wait_serving(address, serve.process, serve.log_path, timeout_s=120)
        before = _greedy_ids(address, golden["prompt"], 8)
        processes[0].kill()  # the worker's own supervisor (compose, Kubernetes) starts a new one
        processes[0].wait()
        _wait_for(lambda: not is_serving(address, timeout_s=1.0), 5.0, "health NOT_SERVING", serve)
        processes.append(_spawn(worker_command(stories_dir, worker_address), tmp_path / "worker-2.log"))
        _wait_for(lambda: bool(serve.events("worker_restarted")), 60.0, "reconnection", serve)
        wait_serving(address, serve.process, serve.log_path, timeout_s=30)
        after = _greedy_ids(address, golden["prompt"], 8)

        assert (before, after) == (expected, expected)
        assert serve.process.poll() is None
    finally:
        stop_processes(processes)
