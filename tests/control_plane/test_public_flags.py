"""`pagedserve serve`'s public-port flags (API keys, TLS) and how they reach the frontend process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagedserve.control_plane.config import FRONTEND_API_KEYS_ENV, ServerConfig
from pagedserve.control_plane.engine.main import build_parser, configs_from_args, shared_public_port
from pagedserve.control_plane.launch.frontend_launcher import _public_env, _public_flags
from pagedserve.runtime.flags import parse_args


def _server(argv: list[str]) -> ServerConfig:
    return configs_from_args(parse_args(build_parser(), argv, os.environ))[0]


def test_api_keys_come_from_repeated_and_comma_separated_flags() -> None:
    assert _server(["--api-key", "k1", "--api-key", "k2,k3"]).api_keys == ("k1", "k2", "k3")


def test_api_keys_from_the_environment_give_way_to_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "env1,env2")

    assert (_server([]).api_keys, _server(["--api-key", "k1"]).api_keys) == (("env1", "env2"), ("k1",))


def test_api_key_file_has_one_key_a_line_and_comments(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  \n")

    assert _server(["--api-key", "k1", "--api-key-file", str(key_file)]).api_keys == ("k1", "file-key-1", "file-key-2")


def test_no_api_key_and_no_tls_by_default() -> None:
    server = _server([])
    assert (server.api_keys, server.tls_cert_file, server.tls_client_ca_file, server.host) == (
        (), None, None, "127.0.0.1")


def test_api_keys_never_show_in_the_configs_repr() -> None:
    assert "hidden-key" not in repr(_server(["--api-key", "hidden-key"]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--tls-cert-file", "cert.pem"], "tls_cert_file and tls_key_file must be given together"),
    (["--tls-client-ca-file", "ca.pem"], "tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file"),
    (["--api-key", "with space"], "api_keys: each must be non-empty printable ASCII without spaces or commas"),
    (["--frontend-processes", "0"], "frontend_processes must be in [1, 64], got 0"),
    (["--frontend-processes", "65"], "frontend_processes must be in [1, 64], got 65"),
])
def test_inconsistent_public_flags_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        _server(argv)
    assert str(info.value) == message


def test_the_frontend_gets_tls_files_as_flags_and_api_keys_only_in_its_environment(tmp_path: Path) -> None:
    server = ServerConfig(api_keys=("k1", "k2"), tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem",
                          tls_client_ca_file=tmp_path / "ca.pem")

    flags = _public_flags(server, max_num_seqs=8)

    assert flags == ["--max-num-seqs", "8", "--tls-cert-file", str(tmp_path / "c.pem"),
                     "--tls-key-file", str(tmp_path / "k.pem"), "--tls-client-ca-file", str(tmp_path / "ca.pem")]
    assert _public_env(server)[FRONTEND_API_KEYS_ENV] == "k1\nk2"


def test_a_frontend_without_keys_inherits_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FRONTEND_API_KEYS_ENV, "stale")

    assert FRONTEND_API_KEYS_ENV not in _public_env(ServerConfig())


def test_several_frontends_share_one_concrete_port_when_any_free_port_is_asked_for() -> None:
    server = shared_public_port(_server(["--port", "0", "--frontend-processes", "2"]))
    assert server.host == "127.0.0.1" and 0 < server.port < 65536


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "50123", "--frontend-processes", "3"]])
def test_one_frontend_or_a_given_port_keeps_the_address_as_given(argv: list[str]) -> None:
    server = _server(argv)
    assert shared_public_port(server) == server


def test_a_bracketed_ipv6_host_gets_its_shared_port_too() -> None:
    server = _server(["--host", "[::]", "--port", "0", "--frontend-processes", "2"])
    try:
        resolved = shared_public_port(server)
    except ValueError as error:  # a host without IPv6
        assert str(error).startswith("--host: cannot listen on [::]:")
    else:
        assert resolved.host == "[::]" and resolved.port > 0
