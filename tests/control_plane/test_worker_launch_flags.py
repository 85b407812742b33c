"""serve hands its local workers its log format and level and their thread count as flags, and none of its own
PAGEDSERVE_* variables, which the worker would read as its flags."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from pagedserve.contract.model_format import Quantization
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret
from pagedserve.runtime.logs import LogFormat, LogLevel


def test_workers_get_log_flags_threads_and_the_secret_but_no_serve_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spawned: list[tuple[list[str], dict[str, str]]] = []
    real_popen = subprocess.Popen

    def popen(command: list[str], env: dict[str, str], **_: Any) -> subprocess.Popen[bytes]:
        spawned.append((command, env))
        return real_popen(["true"])

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setenv("PAGEDSERVE_TLS_CERT_FILE", "/public/cert.pem")
    monkeypatch.setenv("PAGEDSERVE_ENFORCE_EAGER", "true")
    secret = ClusterSecret.generate()
    workers = LocalWorkers(WorkerLaunchConfig(model_dir=Path("m"), cluster_secret=secret, log_format=LogFormat.CONSOLE,
                                              log_level=LogLevel.DEBUG, cpu_threads=3))
    workers.start()
    workers.stop()

    ((command, env),) = spawned
    values = [command[command.index(flag) + 1] for flag in ("--log-format", "--log-level", "--cpu-threads")]
    assert values == ["console", "debug", "3"]
    assert sorted(name for name in env if name.startswith("PAGEDSERVE_")) == [SECRET_ENV]


def _worker_command(monkeypatch: pytest.MonkeyPatch, config: WorkerLaunchConfig) -> list[str]:
    """The command line LocalWorkers starts its one worker with (the process itself is `true`)."""
    spawned: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(command: list[str], env: dict[str, str], **_: Any) -> subprocess.Popen[bytes]:
        spawned.append(command)
        return real_popen(["true"])

    monkeypatch.setattr(subprocess, "Popen", popen)
    workers = LocalWorkers(config)
    workers.start()
    workers.stop()
    (command,) = spawned
    return command


@pytest.mark.parametrize("dependent_launch", [True, False])
def test_workers_launch_plainly_only_when_serve_is_told_to(monkeypatch: pytest.MonkeyPatch,
                                                          dependent_launch: bool) -> None:
    command = _worker_command(monkeypatch, WorkerLaunchConfig(model_dir=Path("m"), dependent_launch=dependent_launch))

    assert ("--no-dependent-launch" in command) is not dependent_launch


@pytest.mark.parametrize("quantize_lm_head", [True, False])
def test_workers_quantize_the_lm_head_only_when_serve_is_told_to(monkeypatch: pytest.MonkeyPatch,
                                                                  quantize_lm_head: bool) -> None:
    command = _worker_command(monkeypatch, WorkerLaunchConfig(model_dir=Path("m"), quantization=Quantization.FP8,
                                                              quantize_lm_head=quantize_lm_head))

    assert ("--quantize-lm-head" in command) is quantize_lm_head


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_workers_compute_batch_invariantly_only_when_told_to(monkeypatch: pytest.MonkeyPatch,
                                                             batch_invariant: bool) -> None:
    command = _worker_command(monkeypatch, WorkerLaunchConfig(model_dir=Path("m"), batch_invariant=batch_invariant))

    assert ("--batch-invariant" in command) is batch_invariant
