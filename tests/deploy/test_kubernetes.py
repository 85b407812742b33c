"""The Kubernetes manifests: valid against the Kubernetes schemas (offline), and consistent with each other, with the
commands the end-to-end tests run, with `serve`'s drain and with the gateway's discovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from smg.launch_router import parse_router_args

from pagedserve.control_plane.config import ServerConfig
from pagedserve.control_plane.engine.main import build_parser

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release we support: native sidecars are on by default from 1.29
PRE_STOP_S = 5


def _documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(MANIFESTS.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str) -> dict[str, Any]:
    (document,) = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return document


def _server_pod() -> dict[str, Any]:
    pod: dict[str, Any] = _one("Deployment", "pagedserve-server")["spec"]["template"]
    return pod


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


@pytest.mark.parametrize("document", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_is_valid_against_the_kubernetes_schema_with_no_unknown_field(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    deployment = _one("Deployment", "pagedserve-server")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_of_the_folder() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert {d["metadata"].get("namespace", "pagedserve") for d in _documents() if d["kind"] != "Namespace"} == {
        kustomization["namespace"]}


def test_the_control_plane_drives_the_pods_own_worker_and_is_probed_on_its_public_port() -> None:
    pod = _server_pod()["spec"]
    (worker,) = pod["initContainers"]
    (control,) = pod["containers"]
    assert worker["restartPolicy"] == "Always"  # a native sidecar: up before the control plane, down after it
    worker_listen = worker["args"][worker["args"].index("--listen") + 1]
    args = build_parser().parse_args(control["args"][1:])
    assert control["args"][0] == "serve" and args.worker == [worker_listen] and worker_listen.startswith("127.0.0.1:")
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"][-2:] == ["pagedserve.clients.health_check", worker_listen]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert control[probe]["grpc"]["port"] == args.port
    assert {p["name"]: p["containerPort"] for p in control["ports"]} == {"grpc": args.port,
                                                                          "metrics": args.metrics_port}


def test_termination_leaves_room_for_the_pre_stop_pause_and_the_whole_drain() -> None:
    pod = _server_pod()["spec"]
    (control,) = pod["containers"]
    assert control["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRE_STOP_S)]
    shutdown_s = float(_env(control)["PAGEDSERVE_SHUTDOWN_TIMEOUT"])
    assert shutdown_s == ServerConfig().shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= PRE_STOP_S + shutdown_s + 5


def test_the_gateway_discovers_exactly_the_server_pods_on_their_public_port() -> None:
    gateway = _one("Deployment", "pagedserve-gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "launch"
    args = parse_router_args(container["args"][1:])
    server = _one("Deployment", "pagedserve-server")
    assert args.backend == "vllm" and args.service_discovery
    assert args.selector == server["spec"]["selector"]["matchLabels"]
    assert args.selector.items() <= server["spec"]["template"]["metadata"]["labels"].items()
    assert not args.selector.items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    (control,) = server["spec"]["template"]["spec"]["containers"]
    assert args.service_discovery_port == build_parser().parse_args(control["args"][1:]).port
    assert args.service_discovery_namespace == server["metadata"]["namespace"]


def test_the_gateway_may_watch_pods_in_its_namespace_and_nothing_more() -> None:
    gateway = _one("Deployment", "pagedserve-gateway")["spec"]["template"]["spec"]
    role, binding = _one("Role", "pagedserve-gateway-discovery"), _one("RoleBinding", "pagedserve-gateway-discovery")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": gateway["serviceAccountName"],
                                    "namespace": "pagedserve"}]
    assert not [d for d in _documents() if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_every_container_runs_as_a_user_without_privileges() -> None:
    for document in _documents():
        if document["kind"] != "Deployment":
            continue
        pod = document["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_only_the_gateway_may_reach_the_servers_public_port() -> None:
    policy = _one("NetworkPolicy", "pagedserve-server")["spec"]
    server = _one("Deployment", "pagedserve-server")
    gateway = _one("Deployment", "pagedserve-gateway")
    (control,) = server["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(control["args"][1:])
    assert policy["podSelector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {args.port, args.metrics_port}
    (source,) = rules[args.port]
    assert source["podSelector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
