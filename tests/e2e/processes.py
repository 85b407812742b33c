"""Starts real worker and control-plane processes on loopback, with the same commands compose.yaml runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pagedserve.clients.health_check import is_serving
from pagedserve.runtime.port_check import free_loopback_port

# The worker device of the end-to-end tests: cpu in CI, cuda to run the same tests on a GPU host.
TEST_DEVICE = os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu")
# The cluster secret every process of a test cluster gets in PAGEDSERVE_CLUSTER_SECRET (compose: from a file).
TEST_CLUSTER_SECRET = "e2e-cluster-secret-0123456789abcdef"


def worker_command(model_dir: Path, listen: str, device: str = TEST_DEVICE, extra: Sequence[str] = ()) -> list[str]:
    return ["pagedserve", "worker", "--model", str(model_dir), "--listen", listen, "--device", device,
            "--log-format", "json", *extra]


def control_plane_command(
    model_dir: Path, worker_address: str, host: str, port: int, metrics_port: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    command = ["pagedserve", "serve", "--model", str(model_dir), "--worker", worker_address, "--host", host,
               "--port", str(port)]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    return [*command, "--log-format", "json", *extra]


def stop_processes(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stops the processes still running, the last started first, and never leaves one behind: a stopped one is
    continued first to take its SIGTERM, one that outlives 15 s of it is killed."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _spawn(command: list[str], log_path: Path, own_process_group: bool = False) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pagedserve.runtime.cli", *command[1:]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PAGEDSERVE_CLUSTER_SECRET": TEST_CLUSTER_SECRET}
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=own_process_group)


def wait_serving(address: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_serving(address, timeout_s=1.0):
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not serving after {timeout_s} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)


def has_exited_within(pid: int, timeout_s: float) -> bool:
    """True once the process pid is gone (reaped by its parent, or a zombie), False if still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True, slots=True)
class Cluster:
    address: str  # the control plane's public address
    worker_address: str
    metrics_port: int
    log_dir: Path
    control_plane: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]


@contextmanager
def running_cluster(
    model_dir: Path, log_dir: Path, serve_args: Sequence[str] = (), worker_args: Sequence[str] = (),
    timeout_s: float = 120.0, control_plane_group: bool = False,
) -> Iterator[Cluster]:
    """A worker process and a control-plane process pointed at it; both stopped (SIGTERM) on exit.
    control_plane_group: the control plane leads a process group of its own, as a job started at a terminal."""
    log_dir.mkdir(parents=True, exist_ok=True)
    worker_address = f"127.0.0.1:{free_loopback_port()}"
    port, metrics_port = free_loopback_port(), free_loopback_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker_log = log_dir / "worker.log"
        processes.append(_spawn(worker_command(model_dir, worker_address, extra=worker_args), worker_log))
        wait_serving(worker_address, processes[0], worker_log, timeout_s)
        control_log = log_dir / "control_plane.log"
        command = control_plane_command(model_dir, worker_address, "127.0.0.1", port, metrics_port, serve_args)
        processes.append(_spawn(command, control_log, own_process_group=control_plane_group))
        wait_serving(f"127.0.0.1:{port}", processes[1], control_log, timeout_s)
        yield Cluster(f"127.0.0.1:{port}", worker_address, metrics_port, log_dir, processes[1], processes[0])
    finally:
        stop_processes(processes)
