"""The public port's guards through a real `serve`: API keys (from flags and a file; health needs none) and TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.clients.client import PagedServeClient, SamplingParams, TlsOptions
from pagedserve.clients.health_check import is_serving
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import common_pb2, generation_service_pb2
from tests.e2e.processes import (
    Cluster,
    _spawn,
    control_plane_command,
    running_cluster,
    stop_processes,
    wait_serving,
    worker_command,
)
from tests.tls_files import TlsFiles, has_openssl, make_tls_files

pytestmark = pytest.mark.e2e

pb = generation_service_pb2
KEY_FLAG, KEY_IN_FILE = "e2e-api-key-flag", "e2e-api-key-file"


@pytest.fixture(scope="module")
def keyed_cluster(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("api-key-logs")
    key_file = logs / "api_keys"
    key_file.write_text(f"# one key a line\n\n{KEY_IN_FILE}\n")
    # running_cluster waits for health SERVING, which needs no key.
    with running_cluster(stories_dir, logs, serve_args=["--api-key", KEY_FLAG, "--api-key-file", str(key_file)]) as c:
        yield c


def _generate(address: str, metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, list[int]]:
    request = pb.GenerateRequest(text="Once upon a time", sampling_params=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=8))
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream("/pagedserve.v1.GenerationService/Generate",
                                    request_serializer=pb.GenerateRequest.SerializeToString,
                                    response_deserializer=pb.GenerateResponse.FromString)
        try:
            return grpc.StatusCode.OK, [t for chunk in call(request, metadata=metadata, timeout=30)
                                        for t in chunk.token_ids]
        except grpc.RpcError as error:
            return error.code(), []


@pytest.mark.parametrize(("metadata", "expected_code"), [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer not-the-key"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Bearer {KEY_FLAG}"),), grpc.StatusCode.OK),
    ((("authorization", f"Bearer {KEY_IN_FILE}"),), grpc.StatusCode.OK),
], ids=["missing", "wrong", "key-from-flag", "key-from-file"])
def test_the_public_port_needs_an_api_key(keyed_cluster: Cluster, golden: dict[str, Any], metadata,
                                          expected_code: grpc.StatusCode) -> None:
    code, token_ids = _generate(keyed_cluster.address, metadata)

    assert code == expected_code
    assert token_ids == (golden["greedy_new_ids"][:8] if code == grpc.StatusCode.OK else [])


def test_health_needs_no_api_key(keyed_cluster: Cluster) -> None:
    assert is_serving(keyed_cluster.address)


def test_api_keys_never_reach_a_command_line(keyed_cluster: Cluster) -> None:
    """The frontend gets the keys in its environment: `ps` shows every user the command lines."""
    command_lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert KEY_IN_FILE not in command_lines


# --- TLS ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not has_openssl():
        pytest.skip("no openssl command to make a certificate with")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_address(stories_dir: Path, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker and a `serve` whose public port speaks TLS; running_cluster's plaintext health probe cannot see it."""
    logs = tmp_path_factory.mktemp("tls-logs")
    worker_address, port = f"127.0.0.1:{free_loopback_port()}", free_loopback_port()
    tls_flags = ["--tls-cert-file", str(tls_files.server_cert), "--tls-key-file", str(tls_files.server_key)]
    processes = [_spawn(worker_command(stories_dir, worker_address), logs / "worker.log")]
    try:
        wait_serving(worker_address, processes[0], logs / "worker.log", 120)
        processes.append(_spawn(control_plane_command(stories_dir, worker_address, "127.0.0.1", port,
                                                      extra=tls_flags), logs / "control_plane.log"))
        address, roots = f"127.0.0.1:{port}", tls_files.ca_cert.read_bytes()
        deadline = time.monotonic() + 120
        while not is_serving(address, timeout_s=1.0, tls_root_certificates=roots):
            assert processes[1].poll() is None, (logs / "control_plane.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the TLS server did not start serving"
            time.sleep(0.1)
        yield address
    finally:
        stop_processes(processes)


def test_tls_serves_a_client_that_trusts_its_ca(tls_address: str, tls_files: TlsFiles,
                                                golden: dict[str, Any]) -> None:
    async def generate() -> list[int]:
        tls = TlsOptions(root_certificates=tls_files.ca_cert.read_bytes())
        async with PagedServeClient(tls_address, tls=tls) as client:
            completions = await client.generate(golden["prompt"], SamplingParams(temperature=0.0, max_tokens=8))
        return completions[0].token_ids

    assert asyncio.run(generate()) == golden["greedy_new_ids"][:8]


def test_tls_port_refuses_plaintext(tls_address: str) -> None:
    assert _generate(tls_address, ())[0] == grpc.StatusCode.UNAVAILABLE


def test_health_check_command_speaks_tls(tls_address: str, tls_files: TlsFiles) -> None:
    command = [sys.executable, "-m", "pagedserve.clients.health_check", tls_address]
    assert subprocess.run([*command, "--tls-ca-file", str(tls_files.ca_cert)], timeout=30).returncode == 0
    assert subprocess.run(command, timeout=30).returncode == 1
