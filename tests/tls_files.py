"""Throwaway TLS files for tests, made with the openssl command: a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate, all signed by the CA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def has_openssl() -> bool:
    return shutil.which("openssl") is not None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: ca_cert signed server_cert (with server_key) and client_cert (with client_key)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(directory: Path, name: str, subject: str, extensions: str) -> tuple[Path, Path]:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)
    return directory / f"{name}.pem", directory / f"{name}.key"


def make_tls_files(directory: Path) -> TlsFiles:
    """Writes the files into directory (which must exist)."""
    _openssl("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=pagedserve test CA", cwd=directory)
    server_cert, server_key = _signed(
        directory, "server", "/CN=localhost",
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = _signed(
        directory, "client", "/CN=pagedserve test client", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    return TlsFiles(directory / "ca.pem", server_cert, server_key, client_cert, client_key)
