"""How `serve` reaches its workers safely: the cluster secret every internal call carries, and TLS to the --worker
workers (plaintext to the local ones on loopback)."""

from __future__ import annotations

import argparse
import dataclasses
import os

import grpc
import structlog

from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret, cluster_secret_from

log = structlog.get_logger()


def cluster_secret_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClusterSecret:
    """--cluster-secret-file's or PAGEDSERVE_CLUSTER_SECRET's secret; without either, a new random one, which this
    process hands to the local workers and the frontend it starts (external workers then need --insecure-no-auth)."""
    try:
        secret = cluster_secret_from(args.cluster_secret_file, os.environ.get(SECRET_ENV))
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if secret is not None:
        return secret
    if args.worker:
        log.warning("cluster_secret_generated", message="no --cluster-secret-file or PAGEDSERVE_CLUSTER_SECRET: "
                    "the --worker workers must run with --insecure-no-auth, or be given the cluster's secret")
    return ClusterSecret.generate()


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerChannelSecurity:
    """How the channels to the workers are secured beside the cluster secret: TLS credentials (None: plaintext)
    and the name the workers' certificates must hold (None: the host of each address)."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str | None = None

    def connect(self, address: str, secret: ClusterSecret) -> GrpcWorkerClient:
        return GrpcWorkerClient(address, secret, self.credentials, self.server_name)


def worker_channel_security_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace,
) -> WorkerChannelSecurity:
    """TLS to the --worker workers when --worker-tls-ca-file is given (with a client certificate for mTLS); plaintext
    otherwise. Exits with a usage error when the flags do not go together, when there are no --worker workers (the
    local ones listen on loopback in plaintext), or when a file cannot be read."""
    ca, cert, key, name = (args.worker_tls_ca_file, args.worker_tls_cert_file, args.worker_tls_key_file,
                           args.worker_tls_server_name)
    if ca is None:
        if cert is not None or key is not None or name is not None:
            parser.error("--worker-tls-cert-file, --worker-tls-key-file and --worker-tls-server-name need "
                         "--worker-tls-ca-file")
        return WorkerChannelSecurity()
    if (cert is None) != (key is None):
        parser.error("--worker-tls-cert-file and --worker-tls-key-file go together")
    if not args.worker:
        parser.error("worker TLS is for external workers (--worker HOST:PORT); the local workers serve starts "
                     "listen on loopback in plaintext")
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(), private_key=key.read_bytes() if key is not None else None,
            certificate_chain=cert.read_bytes() if cert is not None else None,
        )
    except OSError as error:
        parser.error(str(error))
    return WorkerChannelSecurity(credentials, name)
