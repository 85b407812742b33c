"""compose.yaml is a valid Compose file whose services run the commands the end-to-end tests run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.processes import control_plane_command, worker_command

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return compose


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
            str(ROOT / "compose.yaml"),
        ],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_service_runs_the_e2e_worker_command_with_a_gpu_and_a_health_check() -> None:
    worker = _compose()["services"]["gpu-worker"]
    assert ["pagedserve", *worker["command"]] == worker_command(Path("/model"), "0.0.0.0:50061", device="cuda")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["healthcheck"]["test"][-2:] == ["pagedserve.clients.health_check", "127.0.0.1:50061"]


def test_control_plane_waits_for_a_healthy_worker_and_runs_the_e2e_serve_command() -> None:
    control = _compose()["services"]["control-plane"]
    assert ["pagedserve", *control["command"]] == control_plane_command(
        Path("/model"), worker_address="gpu-worker:50061", host="0.0.0.0", port=50051, metrics_port=9400
    )
    assert control["depends_on"] == {"gpu-worker": {"condition": "service_healthy"}}
    assert control["healthcheck"]["test"][-2:] == ["pagedserve.clients.health_check", "127.0.0.1:50051"]


def test_each_service_builds_from_a_dockerfile_in_the_repository() -> None:
    for service in _compose()["services"].values():
        assert (ROOT / service["build"]["dockerfile"]).is_file()
