"""Starts local worker processes for a control plane that was given no --worker addresses."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class WorkerLaunchConfig:
    """How to start each local worker: the same flags `pagedserve worker` takes."""

    model_dir: Path
    num_workers: int = 1
    dtype: DType = DType.AUTO
    device: DeviceKind = DeviceKind.AUTO
    load_format: LoadFormat = LoadFormat.AUTO
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalWorkers:
    """Worker processes owned by this control plane: one per GPU when several are visible, on loopback ports.
    They are terminated when the control plane stops, and only then: each runs in a session of its own, so a
    Ctrl-C at the terminal does not stop them while the frontend still drains open streams."""

    def __init__(self, config: WorkerLaunchConfig) -> None:
        self._config = config
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> list[str]:
        """Starts the workers and returns their addresses (they may still be loading)."""
        addresses = []
        for index in range(self._config.num_workers):
            address = f"127.0.0.1:{free_loopback_port()}"
            env = dict(os.environ)
            if self._config.num_workers > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(index)
            command = [
                sys.executable, "-m", "pagedserve.runtime.cli", "worker",
                "--model", str(self._config.model_dir),
                "--listen", address,
                "--dtype", self._config.dtype.value,
                "--device", self._config.device.value,
                "--load-format", self._config.load_format.value,
                "--seed", str(self._config.seed),
                "--worker-id", f"worker-{index}",
            ]
            self._processes.append(subprocess.Popen(command, env=env, start_new_session=True))
            log.info("worker_started", worker_id=f"worker-{index}", address=address, pid=self._processes[-1].pid)
            addresses.append(address)
        return addresses

    def check_alive(self) -> None:
        """Raises RuntimeError naming the first worker process that has exited."""
        for process in self._processes:
            if process.poll() is not None:
                raise RuntimeError(f"worker process {process.pid} exited with code {process.returncode}")

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def wait_for_workers(clients: Sequence[GrpcWorkerClient], timeout_s: float,
                           launcher: LocalWorkers | None = None) -> None:
    """Waits until every worker serves: WorkerUnavailableError after timeout_s, and RuntimeError at once when
    one of the launcher's worker processes has exited (a worker that failed to load never comes up)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    for client in clients:
        while True:
            try:
                await client.wait_until_serving(timeout_s=1.0)
                break
            except WorkerUnavailableError:
                if launcher is not None:
                    launcher.check_alive()
                if asyncio.get_running_loop().time() > deadline:
                    raise
