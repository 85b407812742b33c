"""The worker port over TLS and mTLS, in-process on port 0: GrpcWorkerClient with the right credentials is served,
a plaintext client or (under mTLS) one without a certificate is refused; the worker's and serve's TLS flags."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import grpc
import pytest

from pagedserve.contract.model_format import DeviceKind
from pagedserve.control_plane.engine import main as serve_main
from pagedserve.control_plane.engine import worker_security
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient
from pagedserve.control_plane.errors import WorkerUnavailableError
from pagedserve.gpu_worker import main as worker_main
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import ClusterSecret
from pagedserve.runtime.flags import parse_args
from tests.gpu_worker.harness import STORIES_DIR
from tests.tls_files import TlsFiles, has_openssl, make_tls_files

SECRET = ClusterSecret("worker-tls-test-secret-0123456789")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not has_openssl():
        pytest.skip("no openssl command to make certificates with")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def worker() -> Worker:
    return Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU, worker_id="worker-tls"))


def _server_credentials(files: TlsFiles, mtls: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(files.server_key.read_bytes(), files.server_cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes() if mtls else None, require_client_auth=mtls,
    )


def _client_credentials(files: TlsFiles, with_certificate: bool) -> grpc.ChannelCredentials:
    if not with_certificate:
        return grpc.ssl_channel_credentials(root_certificates=files.ca_cert.read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=files.ca_cert.read_bytes(),
                                        private_key=files.client_key.read_bytes(),
                                        certificate_chain=files.client_cert.read_bytes())


def _serve(worker: Worker, credentials: grpc.ServerCredentials, test: Callable[[int], Awaitable[None]]) -> None:
    async def run() -> None:
        server = await start_server(worker, "127.0.0.1:0", cluster_secret=SECRET, credentials=credentials)
        try:
            await test(server.port)
        finally:
            await server.stop(0)

    asyncio.run(run())


async def _info_or_error(client: GrpcWorkerClient) -> str:
    """The model the worker reports, or the error's message."""
    try:
        return (await client.get_info()).model
    except WorkerUnavailableError as error:
        return str(error)
    finally:
        await client.close()


def test_tls_client_with_the_ca_is_served_and_a_plaintext_one_is_unavailable(
    tls_files: TlsFiles, worker: Worker,
) -> None:
    async def test(port: int) -> None:
        address = f"127.0.0.1:{port}"
        secure = await _info_or_error(GrpcWorkerClient(address, SECRET, _client_credentials(tls_files, False)))
        named = await _info_or_error(GrpcWorkerClient(address, SECRET, _client_credentials(tls_files, False),
                                                      server_name="localhost"))
        plain = await _info_or_error(GrpcWorkerClient(address, SECRET))

        assert (secure, named) == ("stories260K", "stories260K")
        assert "GetWorkerInfo with UNAVAILABLE" in plain

    _serve(worker, _server_credentials(tls_files, mtls=False), test)


def test_a_server_name_the_certificate_lacks_is_refused(tls_files: TlsFiles, worker: Worker) -> None:
    async def test(port: int) -> None:
        wrong = await _info_or_error(GrpcWorkerClient(f"127.0.0.1:{port}", SECRET,
                                                      _client_credentials(tls_files, False),
                                                      server_name="elsewhere.example"))

        assert "GetWorkerInfo with UNAVAILABLE" in wrong

    _serve(worker, _server_credentials(tls_files, mtls=False), test)


def test_mtls_serves_a_client_with_a_certificate_and_refuses_one_without(tls_files: TlsFiles, worker: Worker) -> None:
    async def test(port: int) -> None:
        address = f"127.0.0.1:{port}"
        with_cert = await _info_or_error(GrpcWorkerClient(address, SECRET, _client_credentials(tls_files, True)))
        without = await _info_or_error(GrpcWorkerClient(address, SECRET, _client_credentials(tls_files, False)))

        assert with_cert == "stories260K"
        assert "GetWorkerInfo with UNAVAILABLE" in without

    _serve(worker, _server_credentials(tls_files, mtls=True), test)


def test_the_client_refuses_a_server_name_without_credentials() -> None:
    with pytest.raises(ValueError, match="server name needs TLS credentials"):
        GrpcWorkerClient("127.0.0.1:1", SECRET, server_name="localhost")


def _worker_args(argv: list[str]) -> tuple[object, str]:
    """worker main's TLS credentials for argv (None: plaintext), or '' for both when it is a usage error."""
    parser = worker_main.build_parser()
    args = parse_args(parser, ["--model", str(STORIES_DIR), *argv], os.environ)
    try:
        return worker_main.server_credentials_from_args(parser, args), ""
    except SystemExit:
        return None, "usage error"


def test_worker_tls_flags(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    files = ["--tls-cert-file", str(tls_files.server_cert), "--tls-key-file", str(tls_files.server_key)]

    plain, _ = _worker_args([])
    tls, _ = _worker_args(files)
    mtls, _ = _worker_args([*files, "--tls-client-ca-file", str(tls_files.ca_cert)])
    errors = [_worker_args(argv)[1] for argv in (files[:2], ["--tls-client-ca-file", str(tls_files.ca_cert)])]
    monkeypatch.setenv("PAGEDSERVE_TLS_CERT_FILE", str(tls_files.server_cert))
    monkeypatch.setenv("PAGEDSERVE_TLS_KEY_FILE", str(tls_files.server_key))
    from_env, _ = _worker_args([])

    assert plain is None
    assert all(isinstance(c, grpc.ServerCredentials) for c in (tls, mtls, from_env))
    assert errors == ["usage error", "usage error"]


def _serve_security(argv: list[str]) -> worker_security.WorkerChannelSecurity | str:
    parser = serve_main.build_parser()
    args = parse_args(parser, argv, os.environ)
    try:
        return worker_security.worker_channel_security_from_args(parser, args)
    except SystemExit:
        return "usage error"


def test_serve_worker_tls_flags(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = ["--worker-tls-ca-file", str(tls_files.ca_cert)]
    client = ["--worker-tls-cert-file", str(tls_files.client_cert), "--worker-tls-key-file", str(tls_files.client_key)]
    external = ["--worker", "10.0.0.2:50061"]

    plain = _serve_security(external)
    tls = _serve_security([*external, *ca, "--worker-tls-server-name", "worker.internal"])
    mtls = _serve_security([*external, *ca, *client])
    unreadable_key = [*client[:2], "--worker-tls-key-file", "/nonexistent"]
    errors = [_serve_security(argv) for argv in ([*external, *client], [*external, *ca, *client[:2]], ca,
                                                 [*external, *ca, *unreadable_key])]
    monkeypatch.setenv("PAGEDSERVE_WORKER_TLS_CA_FILE", str(tls_files.ca_cert))
    from_env = _serve_security(external)

    assert plain == worker_security.WorkerChannelSecurity()
    assert isinstance(tls, worker_security.WorkerChannelSecurity) and tls.server_name == "worker.internal"
    assert all(isinstance(s, worker_security.WorkerChannelSecurity) and s.credentials is not None
               for s in (tls, mtls, from_env))
    assert errors == ["usage error"] * 4
