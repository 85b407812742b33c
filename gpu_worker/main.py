"""`pagedserve worker`: wiring only. Flags and PAGEDSERVE_* variables -> WorkerConfig -> worker -> gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog
import torch

from pagedserve.contract.model_dir import check_model_dir
from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.gpu_worker.parallel.follower import run_follower
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret, cluster_secret_from
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.cpu_threads import usable_cores
from pagedserve.runtime.flags import EPILOG, parse_args, usage_error
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import add_log_flags, configure_logging
from pagedserve.runtime.parent_watch import exit_when_parent_dies
from pagedserve.runtime.port_check import check_port_free
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()
_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags; each also reads PAGEDSERVE_<FLAG> (docs/configuration.md)."""
    p = argparse.ArgumentParser(prog="pagedserve worker", description="Run a worker holding the model and KV cache.",
                                epilog=EPILOG)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model directory (safetensors weights)")
    p.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT to bind; port 0 picks a free one")
    _add_mode_flag(p, "--dtype", DType.AUTO, "weight and KV-cache dtype; auto: config.json's")
    _add_mode_flag(p, "--device", DeviceKind.AUTO, "where the model runs; auto: CUDA when a GPU is visible")
    _add_mode_flag(p, "--load-format", LoadFormat.AUTO, "safetensors files, or dummy (seeded random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights and of unseeded sampling")
    p.add_argument("--worker-id", default="worker-0", help="the name this worker reports to the control plane")
    p.add_argument("--enforce-eager", action="store_true", help="run every step eagerly, without CUDA graphs")
    p.add_argument("--no-dependent-launch", action="store_true",
                   help="launch each kernel only after the one before it has finished (compute capability 9.0+ "
                        "otherwise lets it start early and wait inside: docs/architecture.md)")
    _add_mode_flag(p, "--kv-cache-dtype", KVCacheDType.AUTO,
                   "fp8: store the KV cache as e4m3 with a per-layer scale (about twice the tokens)")
    _add_mode_flag(p, "--quantization", Quantization.NONE,
                   "fp8: quantize linear layers to e4m3 at load (FP8 checkpoints load as FP8 either way)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with FP8 weights (--quantization fp8 or an FP8 checkpoint), quantize the LM head to e4m3 "
                        "too: half its bytes a step, at some cost in agreement (docs/fp8.md)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="CPU worker only: compute each row as if it were alone in its step, so that a sequence's "
                        "tokens do not depend on the sequences beside it, preemption included (slower; "
                        "docs/architecture.md)")
    p.add_argument("--cpu-threads", type=int,
                   help="threads torch may use for CPU work (default: the cores this process may run on)")
    add_log_flags(p)
    p.add_argument("--cluster-secret-file", type=Path,
                   help=f"file holding the secret every caller must send (or the secret itself in {SECRET_ENV})")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="accept every caller without a cluster secret (only where nothing untrusted can connect)")
    p.add_argument("--tls-cert-file", type=Path, help="PEM certificate chain: the port speaks TLS (default plaintext)")
    p.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-client-ca-file", type=Path,
                   help="PEM CA certificates: callers must present a certificate one of them signed (mTLS)")
    p.add_argument("--enable-reflection", action="store_true", help="serve gRPC reflection (off by default)")
    p.add_argument("--parent-pid", type=int,
                   help="exit once this process is no longer our parent (given by the process that starts us)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel group size: the model is sharded over this many worker processes, one per GPU")
    p.add_argument("--tp-rank", type=int, default=0,
                   help="this process's rank in its group: rank 0 serves the control plane (--listen) and leads, "
                        "the others follow it and listen on no port")
    p.add_argument("--tp-rendezvous", metavar="HOST:PORT",
                   help="where rank 0 hosts the group's rendezvous (every rank gives the same; needed with --tp-size "
                        "above 1; unauthenticated: keep it on loopback or a private network)")
    p.add_argument("--tp-timeout", type=float, default=60.0,
                   help="seconds a rank waits in a collective before it gives up and exits (a dead or hung rank)")
    return p


def _add_mode_flag(p: argparse.ArgumentParser, flag: str, default: enum.Enum, help_text: str) -> None:
    mode = type(default)
    p.add_argument(flag, type=mode, default=default, choices=list(mode),
                   metavar="{" + ",".join(m.value for m in mode) + "}", help=help_text)


def cluster_secret_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClusterSecret | None:
    """The secret callers must send; exits with a usage error when none is given without --insecure-no-auth."""
    try:
        secret = cluster_secret_from(args.cluster_secret_file, os.environ.get(SECRET_ENV))
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if secret is not None and args.insecure_no_auth:
        parser.error("--insecure-no-auth contradicts the cluster secret given")
    if secret is None and not args.insecure_no_auth:
        parser.error(f"no cluster secret: give --cluster-secret-file PATH or {SECRET_ENV} (the control plane "
                     "sends the same one), or --insecure-no-auth to accept any caller")
    return secret


def server_credentials_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace,
) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert-file and --tls-key-file (with --tls-client-ca-file: mTLS); None: plaintext.
    Exits with a usage error when the files do not go together or cannot be read."""
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        parser.error("--tls-cert-file and --tls-key-file go together")
    if args.tls_cert_file is None:
        if args.tls_client_ca_file is not None:
            parser.error("--tls-client-ca-file (mTLS) needs --tls-cert-file and --tls-key-file")
        return None
    try:
        chain, key = args.tls_cert_file.read_bytes(), args.tls_key_file.read_bytes()
        client_ca = args.tls_client_ca_file.read_bytes() if args.tls_client_ca_file is not None else None
    except OSError as error:
        parser.error(str(error))
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model_dir=args.model, dtype=args.dtype, device=args.device, load_format=args.load_format, seed=args.seed,
        listen_address=args.listen, worker_id=args.worker_id, enforce_eager=args.enforce_eager,
        dependent_launch=not args.no_dependent_launch,
        tensor_parallel=TensorParallelConfig(args.tp_rank, args.tp_size, args.tp_rendezvous, args.tp_timeout),
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
        cpu_threads=usable_cores() if args.cpu_threads is None else args.cpu_threads,
        batch_invariant=args.batch_invariant,
    )


async def serve(worker: Worker, address: str, secret: ClusterSecret | None, enable_reflection: bool,
                credentials: grpc.ServerCredentials | None = None) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully (a second signal cuts that short). TLS with
    credentials, plaintext without."""
    server = await start_server(worker, address, cluster_secret=secret, enable_reflection=enable_reflection,
                                credentials=credentials)
    host = address.rpartition(":")[0]
    log.info("worker_listening", address=f"{host}:{server.port}", worker_id=worker.config.worker_id,
             tls=credentials is not None)
    await stopped_by_signal()
    log.info("worker_stopping", worker_id=worker.config.worker_id)
    await server.stop(_GRACE_S)
    worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv, os.environ)
    configure_logging(args.log_format, args.log_level.number)
    if args.parent_pid is not None:
        exit_when_parent_dies(args.parent_pid)  # before loading: a parent may die while the weights load
    try:
        check_model_dir(args.model, needs_weights=args.load_format is not LoadFormat.DUMMY)
        config = config_from_args(args)
        if config.tensor_parallel.rank == 0:  # the others listen on no port
            check_port_free(config.listen_address, "--listen")
    except ValueError as error:  # ModelDirError included: one line and exit code 2, before loading anything
        usage_error(parser, str(error))
    is_follower = config.tensor_parallel.rank > 0  # serves no port: no secret or TLS to check
    secret = None if is_follower else cluster_secret_from_args(parser, args)
    if secret is None and not is_follower:
        log.warning("authentication_disabled", flag="--insecure-no-auth",
                    message="any process that reaches this port can drive or reset the worker")
    credentials = server_credentials_from_args(parser, args)
    use_short_turns()
    torch.set_num_threads(config.cpu_threads)
    try:
        worker = Worker.load(config)
    except ModelLoadError as error:  # the weights or their options cannot be served here: one line, exit code 2
        log.error("model_load_failed", model=str(args.model), error=str(error))
        return 2
    freeze_startup_objects()
    if is_follower:
        run_follower(worker)
        return 0
    asyncio.run(serve(worker, config.listen_address, secret, args.enable_reflection, credentials))
    return 0
