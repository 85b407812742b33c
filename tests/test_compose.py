"""compose.yaml is a valid Compose file whose services run the commands the end-to-end tests run, hardened: restarts,
loopback ports, configuration by documented variables, a drain before the kill, a kernel cache, the gateway."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pagedserve.control_plane.config import ServerConfig
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


def test_every_service_restarts_unless_stopped() -> None:
    assert {name: s["restart"] for name, s in _compose()["services"].items()} == {
        "gpu-worker": "unless-stopped", "control-plane": "unless-stopped", "gateway": "unless-stopped",
    }


def test_every_published_port_binds_loopback_unless_the_operator_opens_it() -> None:
    ports = [port for service in _compose()["services"].values() for port in service.get("ports", [])]
    assert len(ports) == 4
    for port in ports:
        assert port.startswith("${PAGEDSERVE_BIND_ADDRESS:-127.0.0.1}:"), port


def test_control_plane_variables_are_serve_flags_documented_in_the_deployment_guide() -> None:
    from pagedserve.control_plane.engine.main import build_parser

    flags = {action.dest for action in build_parser()._actions}
    guide = (ROOT / "docs" / "deployment.md").read_text()
    variables = _compose()["services"]["control-plane"]["environment"]
    assert len(variables) > 10
    for name in variables:
        assert name.startswith("PAGEDSERVE_"), name
        assert name.removeprefix("PAGEDSERVE_").lower() in flags or name == "PAGEDSERVE_CLUSTER_SECRET_FILE", name
        assert f"`{name}`" in guide, name


def test_the_control_plane_may_drain_before_compose_kills_it() -> None:
    control = _compose()["services"]["control-plane"]
    grace_s = float(control["stop_grace_period"].removeprefix("${PAGEDSERVE_STOP_GRACE_PERIOD:-").rstrip("s}"))
    shutdown_s = float(control["environment"]["PAGEDSERVE_SHUTDOWN_TIMEOUT"].removeprefix(
        "${PAGEDSERVE_SHUTDOWN_TIMEOUT:-").rstrip("}"))
    assert shutdown_s == ServerConfig().shutdown_timeout_s
    assert grace_s >= shutdown_s + 5


def test_the_worker_keeps_compiled_kernels_in_a_volume_where_its_image_points_cupy() -> None:
    compose = _compose()
    dockerfile = (ROOT / "docker" / "gpu-worker.Dockerfile").read_text()
    cache_dir = re.search(r"CUPY_CACHE_DIR=(\S+)", dockerfile)
    assert cache_dir is not None
    mounts = [v.split(":") for v in compose["services"]["gpu-worker"]["volumes"]]
    assert any(name in compose["volumes"] and cache_dir.group(1).startswith(target + "/")
               for name, target, *_ in mounts)


def test_gateway_speaks_vllms_protocol_to_the_control_planes_public_port_as_smg_parses_it() -> None:
    from smg.launch_router import parse_router_args

    gateway = _compose()["services"]["gateway"]
    assert gateway["command"][0] == "launch"
    args = parse_router_args(gateway["command"][1:])
    assert args.backend == "vllm"
    assert args.worker_urls == ["grpc://control-plane:50051"]  # the control plane's --port
    assert args.port == 30000 and gateway["ports"][0].endswith(":30000")
    assert gateway["depends_on"] == {"control-plane": {"condition": "service_healthy"}}
