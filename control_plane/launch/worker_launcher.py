"""Starts local worker processes for a control plane that was given no --worker addresses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret
from pagedserve.runtime.flags import ENV_PREFIX
from pagedserve.runtime.logs import LogFormat, LogLevel
from pagedserve.runtime.port_check import free_loopback_port

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
    kv_cache_dtype: KVCacheDType = KVCacheDType.AUTO
    quantization: Quantization = Quantization.NONE
    quantize_lm_head: bool = False  # True: each worker gets --quantize-lm-head
    dependent_launch: bool = True  # False: each worker gets --no-dependent-launch
    batch_invariant: bool = False  # True: each worker gets --batch-invariant (CPU workers only)
    cluster_secret: ClusterSecret | None = None  # handed to each worker in its environment; None: no authentication
    tensor_parallel_size: int = 1  # processes (GPUs) per worker: one tensor-parallel group each
    log_format: LogFormat = LogFormat.AUTO
    log_level: LogLevel = LogLevel.INFO
    cpu_threads: int = 1  # torch threads of each worker process (each rank of a group)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")


class LocalWorkers:
    """Worker processes owned by this control plane: one per GPU when several are visible, on loopback ports.

    With tensor_parallel_size N each worker is a group of N processes (ranks), worker i's rank r on GPU i * N + r:
    rank 0 listens at the worker's address, the others follow it through a rendezvous on another loopback port.
    A group is started, checked and restarted as a unit: a rank that dies takes the group down with it.

    They are terminated when the control plane stops, and only then: each runs in a session of its own, so a
    Ctrl-C at the terminal does not stop them while the frontend still drains open streams. However this process
    dies, they follow it within 2 s: each is told this process's pid (--parent-pid) and exits once it is orphaned.
    The cluster secret reaches them in their environment, never on a command line that `ps` shows; without one
    they run with --insecure-no-auth.
    """

    def __init__(self, config: WorkerLaunchConfig) -> None:
        self._config = config
        self._groups: list[list[subprocess.Popen[bytes]]] = []  # per worker: its ranks' processes, rank 0 first
        self._addresses: list[str] = []

    def start(self) -> list[str]:
        """Starts the workers and returns their addresses (they may still be loading)."""
        for index in range(self._config.num_workers):
            self._addresses.append(f"127.0.0.1:{free_loopback_port()}")
            self._groups.append(self._spawn_group(index))
        return list(self._addresses)

    def worker_index(self, worker_id: str) -> int | None:
        """The index of the local worker that reports worker_id, None if none of them does."""
        ids = [_worker_id(index) for index in range(len(self._groups))]
        return ids.index(worker_id) if worker_id in ids else None

    def restart(self, index: int) -> str:
        """Kills every process of worker index that still runs (a hung worker ignores SIGTERM), then starts the
        whole group again on a fresh port, whose address it returns: another process may have taken the old port
        while the worker was down, and a worker that cannot listen would fail every restart. Blocks until the old
        processes are reaped."""
        for old in self._groups[index]:
            if old.poll() is None:
                old.kill()
        for old in self._groups[index]:
            old.wait()
        self._addresses[index] = f"127.0.0.1:{free_loopback_port()}"
        self._groups[index] = self._spawn_group(index)
        return self._addresses[index]

    def _spawn_group(self, index: int) -> list[subprocess.Popen[bytes]]:
        """Starts worker index's ranks, with a fresh rendezvous port (the old one may linger)."""
        size = self._config.tensor_parallel_size
        if size == 1:
            return [self._spawn(index, 0, ())]
        rendezvous = ("--tp-size", str(size), "--tp-rendezvous", f"127.0.0.1:{free_loopback_port()}")
        return [self._spawn(index, rank, (*rendezvous, "--tp-rank", str(rank))) for rank in range(size)]

    def _spawn(self, index: int, rank: int, tp_flags: Sequence[str]) -> subprocess.Popen[bytes]:
        config, address, worker_id = self._config, self._addresses[index], _worker_id(index)
        # A worker reads PAGEDSERVE_* variables as its flags' values, but serve's (its public port's TLS files, say)
        # are not meant for it: it gets flags, and the secret below, and none of them.
        env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
        if config.num_workers > 1 or config.tensor_parallel_size > 1:
            # Every rank of a group sees the group's GPUs (rank r takes the r-th): NCCL's peer-to-peer transport
            # needs the peers' devices visible, and falls back to copies through host memory otherwise.
            first = index * config.tensor_parallel_size
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + r) for r in range(config.tensor_parallel_size))
        command = [
            sys.executable, "-m", "pagedserve.runtime.cli", "worker",
            "--model", str(config.model_dir),
            "--listen", address,
            "--dtype", config.dtype.value,
            "--device", config.device.value,
            "--load-format", config.load_format.value,
            "--seed", str(config.seed),
            "--kv-cache-dtype", config.kv_cache_dtype.value,
            "--quantization", config.quantization.value,
            "--worker-id", worker_id,
            "--parent-pid", str(os.getpid()),
            "--cpu-threads", str(config.cpu_threads),
            "--log-format", config.log_format.value,
            "--log-level", config.log_level.value,
            *tp_flags,
        ]
        if config.quantize_lm_head:
            command.append("--quantize-lm-head")
        if not config.dependent_launch:
            command.append("--no-dependent-launch")
        if config.batch_invariant:
            command.append("--batch-invariant")
        if config.cluster_secret is None:
            command.append("--insecure-no-auth")
        else:
            env[SECRET_ENV] = config.cluster_secret.value
        process = subprocess.Popen(command, env=env, start_new_session=True)
        log.info("worker_started", worker_id=worker_id, address=address, pid=process.pid, tp_rank=rank)
        return process

    def check_alive(self, index: int | None = None) -> None:
        """Raises RuntimeError naming the first worker process (of all, or only worker index's) that has exited."""
        for process in self._all_processes() if index is None else self._groups[index]:
            if process.poll() is not None:
                raise RuntimeError(f"worker process {process.pid} exited with code {process.returncode}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops every worker: the leaders (rank 0) first, which tell their followers to stop, then any rank left."""
        leaders = [group[0] for group in self._groups]
        self._terminate(leaders, timeout_s)
        self._terminate([process for group in self._groups for process in group[1:]], timeout_s)

    @staticmethod
    def _terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


    def _all_processes(self) -> list[subprocess.Popen[bytes]]:
        return [process for group in self._groups for process in group]


def _worker_id(index: int) -> str:
    return f"worker-{index}"


async def wait_for_workers(clients: Sequence[GrpcWorkerClient], timeout_s: float,
                           launcher: LocalWorkers | None = None) -> None:
    """Waits until every worker serves: WorkerUnavailableError after timeout_s, and RuntimeError at once when
    one of the launcher's worker processes has exited (a worker that failed to load never comes up)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    for client in clients:
        await wait_for_worker(client, deadline, launcher)


class ServingProbe(Protocol):
    async def wait_until_serving(self, timeout_s: float) -> None: ...


async def wait_for_worker(client: ServingProbe, deadline: float, launcher: LocalWorkers | None = None,
                          index: int | None = None) -> None:
    """Waits until the worker serves: WorkerUnavailableError once the loop's clock passes deadline, RuntimeError
    at once when the launcher's worker process index (any of them, for None) has exited."""
    while True:
        try:
            await client.wait_until_serving(timeout_s=1.0)
            return
        except WorkerUnavailableError:
            if launcher is not None:
                launcher.check_alive(index)
            if asyncio.get_running_loop().time() > deadline:
                raise
