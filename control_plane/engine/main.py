"""`pagedserve serve`: wiring only. Flags and PAGEDSERVE_* variables -> configs -> workers, engine, frontend."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog

from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.contract.worker_info import CacheRequest
from pagedserve.control_plane.config import (
    CacheConfig,
    EngineConfig,
    PreemptionMode,
    SchedulerConfig,
    SchedulingPolicy,
    ServerConfig,
    WorkerRestartPolicy,
    WorkerSupervisorConfig,
)
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient, WorkerConnection
from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.control_plane.launch.frontend_launcher import FrontendProcess
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig, wait_for_workers
from pagedserve.control_plane.launch.worker_supervisor import LaneSetup, WorkerSupervisor
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret, ClusterSecretInterceptor, cluster_secret_from
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import LogFormat, configure_logging
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()

_GIB = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve serve", description="Run the control plane (and local workers).")
    p.add_argument("--model", type=Path, help="Hugging Face model directory (default: the built-in tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="use a running worker instead of starting local ones (repeatable)")
    p.add_argument("--num-workers", type=int, default=1, help="local workers to start (one per GPU)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="GPUs (worker processes) each local worker's model is sharded over; each worker then takes "
                        "this many GPUs")
    _add_mode_flag(p, "--dtype", DType.AUTO)
    _add_mode_flag(p, "--device", DeviceKind.AUTO)
    _add_mode_flag(p, "--load-format", LoadFormat.AUTO)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=int)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB of KV cache on a CPU worker")
    p.add_argument("--swap-space", type=float, default=4.0, help="GiB of CPU swap space per worker")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    p.add_argument("--max-num-waiting", type=int, default=4096, help="admission queue bound")
    p.add_argument("--scheduling-policy", default="fcfs", choices=[m.value for m in SchedulingPolicy])
    p.add_argument("--preemption-mode", default="recompute", choices=[m.value for m in PreemptionMode])
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-steps-in-flight", type=int, default=EngineConfig().max_steps_in_flight)
    p.add_argument("--step-timeout", type=float, default=EngineConfig().step_timeout_s,
                   help="seconds a worker may leave a step unanswered before it counts as hung and its lane dies")
    p.add_argument("--cluster-secret-file", type=Path,
                   help=f"file holding the secret of the internal services (or the secret itself in {SECRET_ENV}); "
                        "default: a random one for the local workers and the frontend")
    _add_mode_flag(p, "--worker-restart", WorkerRestartPolicy.ON_FAILURE)
    p.add_argument("--max-worker-restarts", type=int, default=WorkerSupervisorConfig().max_restarts,
                   help="tries to bring one worker back within 10 minutes before its lane is given up")
    p.add_argument("--shutdown-timeout", type=float, default=ServerConfig().shutdown_timeout_s,
                   help="seconds requests in flight may run on after SIGTERM/SIGINT before they are ended")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--api-key", action="extend", type=_comma_separated, default=[], metavar="KEY",
                   help="require metadata 'authorization: Bearer KEY' on the public port, health checks excepted "
                        "(repeatable, or comma-separated; env PAGEDSERVE_API_KEY)")
    p.add_argument("--api-key-file", type=Path, help="file of API keys, one per line ('#' comments)")
    p.add_argument("--tls-cert-file", type=Path, help="PEM certificate chain: the public port speaks TLS")
    p.add_argument("--tls-key-file", type=Path, help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-client-ca-file", type=Path,
                   help="PEM CA certificates: clients must present a certificate one of them signed (mTLS)")
    p.add_argument("--worker-tls-ca-file", type=Path,
                   help="PEM CA certificates that signed the --worker workers' certificates: reach them over TLS")
    p.add_argument("--worker-tls-cert-file", type=Path,
                   help="PEM certificate chain this process presents to the --worker workers (their mTLS)")
    p.add_argument("--worker-tls-key-file", type=Path, help="PEM private key of --worker-tls-cert-file")
    p.add_argument("--worker-tls-server-name",
                   help="name the workers' certificates must hold (default: the host of each --worker address)")
    p.add_argument("--log-format", default="auto", choices=[f.value for f in LogFormat])
    return p


def _comma_separated(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values, then --api-key-file's lines (blank ones and '#' comments skipped)."""
    keys = list(args.api_key)
    if args.api_key_file is not None:
        lines = (line.strip() for line in args.api_key_file.read_text(encoding="ascii").splitlines())
        keys += [line for line in lines if line and not line.startswith("#")]
    return tuple(keys)


def _add_mode_flag(p: argparse.ArgumentParser, flag: str, default: enum.Enum) -> None:
    """A flag parsed into a member of default's enum; usage and --help list the members' plain values."""
    mode = type(default)
    p.add_argument(flag, type=mode, default=default, choices=list(mode),
                   metavar="{" + ",".join(m.value for m in mode) + "}")


def _env_defaults(parser: argparse.ArgumentParser) -> None:
    """PAGEDSERVE_<FLAG> environment variables override the built-in defaults (flags still win)."""
    for action in parser._actions:
        name = f"PAGEDSERVE_{action.dest.upper()}"
        if action.dest != "help" and name in os.environ:
            raw = os.environ[name]
            value: object = raw.split(",") if action.dest == "worker" else raw
            # action.type may also be a registry name (a str); every flag here gives a converter, or none.
            if callable(action.type) and action.dest != "worker":
                value = action.type(raw)
            parser.set_defaults(**{action.dest: value})


def configs_from_args(
    args: argparse.Namespace,
) -> tuple[ServerConfig, SchedulerConfig, CacheConfig, EngineConfig]:
    server = ServerConfig(
        host=args.host, port=args.port, model_dir=args.model, worker_addresses=tuple(args.worker),
        num_workers=args.num_workers, dtype=args.dtype, device=args.device, load_format=args.load_format,
        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, metrics_port=args.metrics_port,
        log_format=LogFormat(args.log_format),
        api_keys=_api_keys(args), tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file, shutdown_timeout_s=args.shutdown_timeout,
    )
    scheduler = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_num_waiting=args.max_num_waiting,
        scheduling_policy=SchedulingPolicy(args.scheduling_policy),
        preemption_mode=PreemptionMode(args.preemption_mode),
    )
    cache = CacheConfig(
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=int(args.kv_cache_memory * _GIB), swap_space_bytes=int(args.swap_space * _GIB),
        enable_prefix_caching=args.enable_prefix_caching,
    )
    engine = EngineConfig(max_steps_in_flight=args.max_steps_in_flight, step_timeout_s=args.step_timeout)
    return server, scheduler, cache, engine


def supervisor_config_from_args(args: argparse.Namespace, server: ServerConfig) -> WorkerSupervisorConfig:
    return WorkerSupervisorConfig(restart_policy=args.worker_restart, max_restarts=args.max_worker_restarts,
                                  worker_start_timeout_s=server.worker_start_timeout_s)


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


def cache_request(scheduler: SchedulerConfig, cache: CacheConfig) -> CacheRequest:
    """What InitCache asks of each worker for these configs."""
    return CacheRequest(
        block_size=cache.block_size, gpu_memory_utilization=cache.gpu_memory_utilization,
        num_gpu_blocks_override=cache.num_gpu_blocks_override, kv_cache_memory_bytes=cache.kv_cache_memory_bytes,
        swap_space_bytes=cache.swap_space_bytes, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        max_num_seqs=scheduler.max_num_seqs, max_model_len=scheduler.max_model_len,
    )


async def start_engine(
    workers: Sequence[WorkerConnection], scheduler: SchedulerConfig, cache: CacheConfig, engine_config: EngineConfig,
    model_dir: Path, model_name: str,
) -> tuple[Engine, ServedModel, Tokenizer]:
    """Sizes every worker's cache (which also resets it), builds one scheduler per worker and starts the engine."""
    infos = await asyncio.gather(*(w.get_info() for w in workers))
    init = cache_request(scheduler, cache)
    caches = await asyncio.gather(*(w.init_cache(init) for w in workers))
    info = infos[0]
    max_model_len = min(scheduler.max_model_len or info.max_position_embeddings, info.max_position_embeddings)
    scheduler = dataclasses.replace(scheduler, max_model_len=max_model_len)
    for worker, blocks in zip(infos, caches, strict=True):
        log.info("worker_ready", worker_id=worker.worker_id, device=worker.device, dtype=worker.dtype,
                 num_gpu_blocks=blocks.num_gpu_blocks, num_cpu_blocks=blocks.num_cpu_blocks)
    tokenizer = Tokenizer(model_dir)
    model = ServedModel(
        name=model_name, architecture=info.architecture, dtype=info.dtype, vocab_size=info.vocab_size,
        max_model_len=max_model_len, block_size=cache.block_size,
        num_gpu_blocks=sum(c.num_gpu_blocks for c in caches), num_workers=len(workers),
        eos_token_ids=tokenizer.eos_token_ids,
    )
    lanes = [
        (worker.worker_id, Scheduler(scheduler, cache, blocks.num_gpu_blocks, blocks.num_cpu_blocks), connection)
        for worker, blocks, connection in zip(infos, caches, workers, strict=True)
    ]
    engine = Engine(lanes, tokenizer, engine_config, EngineMetrics(model_name))
    engine.start()
    return engine, model, tokenizer


async def serve(server: ServerConfig, scheduler: SchedulerConfig, cache: CacheConfig, engine_config: EngineConfig,
                supervision: WorkerSupervisorConfig, secret: ClusterSecret, model_dir: Path, runtime_dir: Path,
                security: WorkerChannelSecurity | None = None) -> int:
    """Runs workers (unless given), the engine and, beside it, the frontend process with the public server, until
    SIGINT/SIGTERM (drain, then 0), until the frontend exits (1) or until no worker is left (1). Dead workers are
    brought back by a WorkerSupervisor. Every internal call carries secret; the worker channels are secured by
    security (default: plaintext). runtime_dir holds the engine's socket."""
    channels = security or WorkerChannelSecurity()
    launcher = None
    addresses = list(server.worker_addresses)
    if not addresses:
        launcher = LocalWorkers(WorkerLaunchConfig(
            model_dir=model_dir, num_workers=server.num_workers, dtype=server.dtype, device=server.device,
            load_format=server.load_format, seed=server.seed, cluster_secret=secret,
            tensor_parallel_size=server.tensor_parallel_size,
        ))
        addresses = launcher.start()
    clients = [channels.connect(address, secret) for address in addresses]
    try:
        try:
            await wait_for_workers(clients, server.worker_start_timeout_s, launcher)
            infos = await asyncio.gather(*(c.get_info() for c in clients))
            model_name = server.model_dir.name if server.model_dir else BUILTIN_MODEL_NAME
            engine, model, _ = await start_engine(clients, scheduler, cache, engine_config, model_dir, model_name)
        except (PagedServeError, RuntimeError) as error:  # a worker unreachable, refusing us, or dead at start
            log.error("serve_start_failed", error=str(error))
            await asyncio.gather(*(c.close() for c in clients))
            return 1
        resolved = dataclasses.replace(scheduler, max_model_len=model.max_model_len)
        supervisor = WorkerSupervisor(
            engine, list(zip(clients, infos, strict=True)), launcher,
            LaneSetup(cache_request(resolved, cache), resolved, cache), supervision,
            connect=lambda address: channels.connect(address, secret),
        )
        if server.metrics_port is not None:
            engine.metrics.serve(server.host, server.metrics_port)
        engine_address = f"unix:{runtime_dir / 'engine.sock'}"
        engine_server = await build_engine_server(EngineServicer(engine, model), engine_address,
                                                  (ClusterSecretInterceptor(secret),))
        await engine_server.start()
        frontend = await FrontendProcess.start(engine_address, model_dir, server.address, server.log_format,
                                               server=server, max_num_seqs=scheduler.max_num_seqs,
                                               cluster_secret=secret)
        freeze_startup_objects()
        code = await _run_until_stopped(engine, frontend, supervisor, server.shutdown_timeout_s)
        await engine_server.stop(grace=None)
        await supervisor.stop()  # before the engine: its lanes die of the stop, and must not be restarted
        await engine.stop()
        await supervisor.close()
        return code
    finally:
        if launcher is not None:
            launcher.stop()


async def _run_until_stopped(
    engine: Engine, frontend: FrontendProcess, supervisor: WorkerSupervisor, shutdown_timeout_s: float,
) -> int:
    """0 after SIGINT/SIGTERM, once the engine has drained (its requests get shutdown_timeout_s to finish) and the
    frontend has stopped; 1 when the frontend exits, or the last worker is lost, by itself."""
    frontend_exit = asyncio.ensure_future(frontend.wait())
    workers_lost = asyncio.ensure_future(supervisor.all_lost.wait())
    either = asyncio.ensure_future(asyncio.wait([frontend_exit, workers_lost], return_when=asyncio.FIRST_COMPLETED))
    stopped = await stopped_by_signal(either)
    has_frontend_exited = frontend_exit.done()
    for future in (frontend_exit, workers_lost):
        future.cancel()
    if stopped:
        log.info("server_stopping", shutdown_timeout_s=shutdown_timeout_s)
        await engine.drain(shutdown_timeout_s)
    elif has_frontend_exited:
        log.error("frontend_exited", code=await frontend.wait())
    else:
        log.error("server_exiting", reason="no worker left: every lane is dead and none is being restarted")
    await frontend.stop()
    return 0 if stopped else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _env_defaults(parser)
    args = parser.parse_args(argv)
    configure_logging(LogFormat(args.log_format))
    use_short_turns()
    server, scheduler, cache, engine_config = configs_from_args(args)
    supervision = supervisor_config_from_args(args, server)
    secret = cluster_secret_from_args(parser, args)
    security = worker_channel_security_from_args(parser, args)
    with tempfile.TemporaryDirectory(prefix="pagedserve-") as scratch:
        model_dir = server.model_dir
        if model_dir is None:
            model_dir = write_builtin_model(Path(scratch) / BUILTIN_MODEL_NAME)
            server = dataclasses.replace(server, load_format=LoadFormat.DUMMY)
            log.warning("using_builtin_model", model=BUILTIN_MODEL_NAME, weights="deterministic random (dummy)",
                        message=f"no --model given: serving the built-in {BUILTIN_MODEL_NAME}, a small Llama with "
                                "random weights and a locally built tokenizer; its text is not meaningful")
        return asyncio.run(serve(server, scheduler, cache, engine_config, supervision, secret, model_dir,
                                 Path(scratch), security))
