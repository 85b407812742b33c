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

import structlog

from pagedserve.contract.model_dir import ModelDirError, check_model_dir, check_tokenizer_dir
from pagedserve.contract.model_format import LoadFormat
from pagedserve.contract.worker_info import CacheRequest, WorkerInfo
from pagedserve.control_plane.config import (
    CPU_KV_CACHE_CAP_BYTES,
    GPU_SWAP_SPACE_BYTES,
    MAX_STEPS_IN_FLIGHT,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
    WorkerRestartPolicy,
    WorkerSupervisorConfig,
)
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.model_len import check_model_limit, fit_to_pools
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.engine.worker_client import WorkerConnection
from pagedserve.control_plane.engine.worker_security import (
    WorkerChannelSecurity,
    cluster_secret_from_args,
    worker_channel_security_from_args,
)
from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.control_plane.launch.frontend_launcher import FrontendProcess
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig, wait_for_workers
from pagedserve.control_plane.launch.worker_supervisor import LaneSetup, WorkerSupervisor
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.chat_template import load_chat_template
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.auth import SECRET_ENV, ClusterSecret, ClusterSecretInterceptor
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.cpu_threads import local_worker_threads, usable_cores
from pagedserve.runtime.flags import EPILOG, parse_args, usage_error
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import add_log_flags, configure_logging
from pagedserve.runtime.port_check import check_port_free, free_port
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()

_GIB = 1 << 30
_MAX_NUM_WAITING = 4096  # the served queue's bound; the offline LLM has none, it admits all its prompts at once


def build_parser() -> argparse.ArgumentParser:
    """serve's flags, defaults taken from the configs (which the offline LLM uses too); each also reads
    PAGEDSERVE_<FLAG> (docs/configuration.md)."""
    server, scheduler, cache, engine = ServerConfig(), SchedulerConfig(), CacheConfig(), EngineConfig()
    p = argparse.ArgumentParser(prog="pagedserve serve", description="Run the control plane (and local workers).",
                                epilog=EPILOG)
    p.add_argument("--model", type=Path, help="Hugging Face model directory (default: the built-in tiny model)")
    p.add_argument("--tokenizer", type=Path, help="directory of the tokenizer (tokenizer.json); default: --model's")
    p.add_argument("--host", default=server.host, help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=server.port, help="public gRPC port")
    p.add_argument("--frontend-processes", type=int, default=server.frontend_processes,
                   help="frontend processes sharing the public port, each streaming its own clients (vLLM's "
                        "--api-server-count): one streams about 30,000 tokens a second")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="use a running worker instead of starting local ones (repeatable; comma-separated in env)")
    p.add_argument("--num-workers", type=int, default=server.num_workers,
                   help="local workers to start (one per GPU, or per --tensor-parallel-size GPUs)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=server.tensor_parallel_size,
                   help="GPUs (worker processes) each local worker's model is sharded over; each worker then takes "
                        "this many GPUs")
    _add_mode_flag(p, "--dtype", server.dtype, "weight and KV-cache dtype; auto: config.json's")
    _add_mode_flag(p, "--device", server.device, "where local workers run; auto: CUDA when a GPU is visible")
    _add_mode_flag(p, "--load-format", server.load_format, "safetensors files, or dummy (seeded random weights)")
    _add_mode_flag(p, "--kv-cache-dtype", server.kv_cache_dtype,
                   "fp8: local workers store the KV cache as e4m3 with a per-layer scale (about twice the tokens)")
    _add_mode_flag(p, "--quantization", server.quantization,
                   "fp8: local workers quantize linear layers to e4m3 at load")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="with FP8 weights (--quantization fp8 or an FP8 checkpoint): local workers quantize the LM "
                        "head to e4m3 too (docs/fp8.md)")
    p.add_argument("--no-dependent-launch", action="store_true",
                   help="local workers launch each kernel only after the one before it has finished (pagedserve "
                        "worker --no-dependent-launch)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="local CPU workers compute each row as if it were alone in its step, so that a sequence's "
                        "tokens do not depend on the sequences beside it (pagedserve worker --batch-invariant)")
    p.add_argument("--seed", type=int, default=server.seed, help="seed of dummy weights and of unseeded sampling")
    p.add_argument("--cpu-threads", type=int, help="torch threads of each local CPU worker process (default: the "
                   "cores this process may use, less one for the control plane, shared among the local workers' "
                   "processes)")
    p.add_argument("--block-size", type=int, default=cache.block_size, help="tokens per KV block")
    p.add_argument("--gpu-memory-utilization", type=float, default=cache.gpu_memory_utilization,
                   help="share of GPU memory for weights, activations and the KV pool")
    p.add_argument("--num-gpu-blocks-override", type=int, help="exact KV blocks per worker (skips profiling)")
    p.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                   help=f"GiB of KV pool on a CPU worker (default: what --max-num-seqs sequences of --max-model-len "
                        f"tokens need, at most {CPU_KV_CACHE_CAP_BYTES / _GIB:g} unless one sequence needs more)")
    p.add_argument("--swap-space", type=float, metavar="GIB", help="GiB of CPU memory per worker for preempted "
                   f"requests' blocks (default: 0 on CPU, {GPU_SWAP_SPACE_BYTES // _GIB} on GPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=scheduler.max_num_batched_tokens,
                   help="token budget of one step")
    p.add_argument("--max-num-seqs", type=int, default=scheduler.max_num_seqs, help="running sequences per worker")
    p.add_argument("--max-model-len", type=int,
                   help="prompt + output tokens per sequence (an error above the model's max_position_embeddings "
                        "or what a KV pool holds); default: the model's, shrunk to the KV pool with a warning")
    p.add_argument("--max-num-waiting", type=int, default=_MAX_NUM_WAITING,
                   help="requests waiting per worker before new ones get RESOURCE_EXHAUSTED")
    _add_mode_flag(p, "--scheduling-policy", scheduler.scheduling_policy, "admission order of waiting requests")
    _add_mode_flag(p, "--preemption-mode", scheduler.preemption_mode,
                   "what happens to a request preempted for lack of KV blocks")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=cache.enable_prefix_caching, help="reuse the KV blocks of prompts' common prefixes")
    p.add_argument("--max-steps-in-flight", type=int, default=engine.max_steps_in_flight,
                   help=f"steps planned ahead of their results per worker (1 to {MAX_STEPS_IN_FLIGHT})")
    p.add_argument("--step-timeout", type=float, default=engine.step_timeout_s,
                   help="seconds a worker may leave a step unanswered before it counts as hung and its lane dies")
    p.add_argument("--worker-failure-retries", type=int, default=engine.worker_failure_retries,
                   help="worker failures a request rides through, recomputed on another live worker (0: it fails "
                        "with its worker)")
    p.add_argument("--worker-failure-wait", type=float, default=engine.worker_failure_wait_s,
                   help="seconds such a request waits for a restarted worker when no live one holds it")
    p.add_argument("--cluster-secret-file", type=Path,
                   help=f"file holding the secret of the internal services (or the secret itself in {SECRET_ENV}); "
                        "default: a random one for the local workers and the frontend")
    _add_mode_flag(p, "--worker-restart", WorkerRestartPolicy.ON_FAILURE, "what to do when a worker dies")
    p.add_argument("--max-worker-restarts", type=int, default=WorkerSupervisorConfig().max_restarts,
                   help="tries to bring one worker back within 10 minutes before its lane is given up")
    p.add_argument("--shutdown-timeout", type=float, default=server.shutdown_timeout_s,
                   help="seconds requests in flight may run on after SIGTERM/SIGINT before they are ended")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: none)")
    p.add_argument("--api-key", action="extend", type=_comma_separated, default=[], metavar="KEY",
                   help="require metadata 'authorization: Bearer KEY' on the public port, health checks excepted "
                        "(repeatable, or comma-separated)")
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
    p.add_argument("--chat-template", metavar="FILE_OR_STRING",
                   help="Jinja chat template for Chat, as a file or the template's text (default: the model's)")
    add_log_flags(p)
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


def _add_mode_flag(p: argparse.ArgumentParser, flag: str, default: enum.Enum, help_text: str) -> None:
    """A flag parsed into a member of default's enum; usage and --help list the members' plain values."""
    mode = type(default)
    p.add_argument(flag, type=mode, default=default, choices=list(mode),
                   metavar="{" + ",".join(m.value for m in mode) + "}", help=help_text)


def configs_from_args(
    args: argparse.Namespace,
) -> tuple[ServerConfig, SchedulerConfig, CacheConfig, EngineConfig]:
    server = ServerConfig(
        host=args.host, port=args.port, model_dir=args.model, worker_addresses=tuple(args.worker),
        num_workers=args.num_workers, dtype=args.dtype, device=args.device, load_format=args.load_format,
        seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
        dependent_launch=not args.no_dependent_launch, batch_invariant=args.batch_invariant,
        metrics_port=args.metrics_port, log_format=args.log_format,
        log_level=args.log_level, tokenizer_dir=args.tokenizer, cpu_threads=args.cpu_threads,
        api_keys=_api_keys(args), tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file, shutdown_timeout_s=args.shutdown_timeout,
        chat_template=args.chat_template, frontend_processes=args.frontend_processes,
    )
    scheduler = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_num_waiting=args.max_num_waiting,
        scheduling_policy=args.scheduling_policy, preemption_mode=args.preemption_mode,
    )
    cache = CacheConfig(
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=_bytes(args.kv_cache_memory), swap_space_bytes=_bytes(args.swap_space),
        enable_prefix_caching=args.enable_prefix_caching,
    )
    engine = EngineConfig(max_steps_in_flight=args.max_steps_in_flight, step_timeout_s=args.step_timeout,
                          worker_failure_retries=args.worker_failure_retries,
                          worker_failure_wait_s=args.worker_failure_wait)
    return server, scheduler, cache, engine


def _bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * _GIB)


def supervisor_config_from_args(args: argparse.Namespace, server: ServerConfig) -> WorkerSupervisorConfig:
    return WorkerSupervisorConfig(restart_policy=args.worker_restart, max_restarts=args.max_worker_restarts,
                                  worker_start_timeout_s=server.worker_start_timeout_s)


def cache_request(scheduler: SchedulerConfig, cache: CacheConfig) -> CacheRequest:
    """What InitCache asks of each worker for these configs (cache's sizes resolved by sized_for)."""
    return CacheRequest(
        block_size=cache.block_size, gpu_memory_utilization=cache.gpu_memory_utilization,
        num_gpu_blocks_override=cache.num_gpu_blocks_override, kv_cache_memory_bytes=cache.kv_cache_memory_bytes or 0,
        swap_space_bytes=cache.swap_space_bytes or 0, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        max_num_seqs=scheduler.max_num_seqs, max_model_len=scheduler.max_model_len,
    )


def sized_for(
    info: WorkerInfo, scheduler: SchedulerConfig, cache: CacheConfig,
) -> tuple[SchedulerConfig, CacheConfig]:
    """The configs with what depends on the worker filled in: max_model_len (at most the model's), the cache
    sizes left to the device (CacheConfig.for_worker)."""
    max_model_len = min(scheduler.max_model_len or info.max_position_embeddings, info.max_position_embeddings)
    cache = cache.for_worker(info.device, info.kv_bytes_per_token, scheduler.max_num_seqs, max_model_len)
    return dataclasses.replace(scheduler, max_model_len=max_model_len), cache


async def start_engine(
    workers: Sequence[WorkerConnection], scheduler: SchedulerConfig, cache: CacheConfig, engine_config: EngineConfig,
    tokenizer_dir: Path, model_name: str,
) -> tuple[Engine, ServedModel, Tokenizer]:
    """Sizes every worker's cache (which also resets it), builds one scheduler per worker and starts the engine.
    MaxModelLenError (model_len.py) when --max-model-len exceeds the model's limit or a pool."""
    infos = await asyncio.gather(*(w.get_info() for w in workers))
    info = infos[0]
    max_model_len = check_model_limit(scheduler.max_model_len, info.max_position_embeddings)
    sized, cache = sized_for(info, dataclasses.replace(scheduler, max_model_len=max_model_len), cache)
    init = cache_request(sized, cache)
    caches = await asyncio.gather(*(w.init_cache(init) for w in workers))
    pools = [(worker.worker_id, blocks.num_gpu_blocks) for worker, blocks in zip(infos, caches, strict=True)]
    max_model_len = fit_to_pools(max_model_len, scheduler.max_model_len is not None, pools, cache.block_size)
    scheduler = dataclasses.replace(sized, max_model_len=max_model_len)
    for worker, blocks in zip(infos, caches, strict=True):
        log.info("worker_ready", worker_id=worker.worker_id, device=worker.device, dtype=worker.dtype,
                 num_gpu_blocks=blocks.num_gpu_blocks, num_cpu_blocks=blocks.num_cpu_blocks,
                 kv_cache_bytes=blocks.num_gpu_blocks * cache.block_size * worker.kv_bytes_per_token,
                 swap_space_bytes=blocks.num_cpu_blocks * cache.block_size * worker.kv_bytes_per_token)
    tokenizer = Tokenizer(tokenizer_dir)
    model = ServedModel(
        name=model_name, architecture=info.architecture, dtype=info.dtype, vocab_size=info.vocab_size,
        max_model_len=scheduler.max_model_len or info.max_position_embeddings, block_size=cache.block_size,
        num_gpu_blocks=sum(c.num_gpu_blocks for c in caches), num_workers=len(workers),
        eos_token_ids=tokenizer.eos_token_ids,
    )
    lanes = [
        (worker.worker_id, Scheduler(scheduler, cache, blocks.num_gpu_blocks, blocks.num_cpu_blocks), connection)
        for worker, blocks, connection in zip(infos, caches, workers, strict=True)
    ]
    engine = Engine(lanes, tokenizer, engine_config, EngineMetrics(model_name, max_model_len))
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
    tokenizer_dir = server.tokenizer_dir or model_dir
    launcher = None
    addresses = list(server.worker_addresses)
    if not addresses:
        launcher = LocalWorkers(WorkerLaunchConfig(
            model_dir=model_dir, num_workers=server.num_workers, dtype=server.dtype, device=server.device,
            load_format=server.load_format, seed=server.seed, kv_cache_dtype=server.kv_cache_dtype,
            quantization=server.quantization, quantize_lm_head=server.quantize_lm_head,
            dependent_launch=server.dependent_launch, batch_invariant=server.batch_invariant, cluster_secret=secret,
            tensor_parallel_size=server.tensor_parallel_size,
            log_format=server.log_format, log_level=server.log_level,
            cpu_threads=server.cpu_threads or local_worker_threads(server.num_workers * server.tensor_parallel_size,
                                                                   usable_cores()),
        ))
        addresses = launcher.start()
    clients = [channels.connect(address, secret) for address in addresses]
    try:
        try:
            await wait_for_workers(clients, server.worker_start_timeout_s, launcher)
            infos = await asyncio.gather(*(c.get_info() for c in clients))
            model_name = server.model_dir.name if server.model_dir else BUILTIN_MODEL_NAME
            engine, model, _ = await start_engine(clients, scheduler, cache, engine_config, tokenizer_dir,
                                                  model_name)
        except (PagedServeError, RuntimeError) as error:  # a worker unreachable, refusing us, or dead at start
            log.error("serve_start_failed", error=str(error))
            await asyncio.gather(*(c.close() for c in clients))
            return 1
        resolved, resolved_cache = sized_for(infos[0], scheduler, cache)
        supervisor = WorkerSupervisor(
            engine, list(zip(clients, infos, strict=True)), launcher,
            LaneSetup(cache_request(resolved, resolved_cache), resolved, resolved_cache), supervision,
            connect=lambda address: channels.connect(address, secret),
        )
        if server.metrics_port is not None:
            engine.metrics.serve(server.host, server.metrics_port)
        engine_address = f"unix:{runtime_dir / 'engine.sock'}"
        engine_server = await build_engine_server(EngineServicer(engine, model), engine_address,
                                                  (ClusterSecretInterceptor(secret),))
        await engine_server.start()
        frontends = [await FrontendProcess.start(engine_address, tokenizer_dir, server.address, server.log_format,
                                                 server=server, max_num_seqs=scheduler.max_num_seqs,
                                                 cluster_secret=secret, log_level=server.log_level, index=index)
                     for index in range(server.frontend_processes)]
        freeze_startup_objects()
        code = await _run_until_stopped(engine, frontends, supervisor, server.shutdown_timeout_s)
        await engine_server.stop(grace=None)
        await supervisor.stop()  # before the engine: its lanes die of the stop, and must not be restarted
        await engine.stop()
        await supervisor.close()
        return code
    finally:
        if launcher is not None:
            launcher.stop()


async def _run_until_stopped(
    engine: Engine, frontends: list[FrontendProcess], supervisor: WorkerSupervisor, shutdown_timeout_s: float,
) -> int:
    """0 after SIGINT/SIGTERM, once the engine has drained (its requests get shutdown_timeout_s to finish) and the
    frontends have stopped; 1 when a frontend exits, or the last worker is lost, by itself."""
    frontend_exits = [asyncio.ensure_future(frontend.wait()) for frontend in frontends]
    workers_lost = asyncio.ensure_future(supervisor.all_lost.wait())
    either = asyncio.ensure_future(asyncio.wait([*frontend_exits, workers_lost],
                                                return_when=asyncio.FIRST_COMPLETED))
    stopped = await stopped_by_signal(either)
    exited = [index for index, frontend_exit in enumerate(frontend_exits) if frontend_exit.done()]
    for future in (*frontend_exits, workers_lost):
        future.cancel()
    if stopped:
        log.info("server_stopping", shutdown_timeout_s=shutdown_timeout_s)
        await engine.drain(shutdown_timeout_s)
    elif exited:
        log.error("frontend_exited", index=exited[0], code=await frontends[exited[0]].wait())
    else:
        log.error("server_exiting", reason="no worker left: every lane is dead and none is being restarted")
    await asyncio.gather(*(frontend.stop() for frontend in frontends))
    return 0 if stopped else 1


def shared_public_port(server: ServerConfig) -> ServerConfig:
    """server with a concrete public port when several frontends are to share it and port 0 (any free port) was
    asked for: picked here, once, before anything starts, rather than by each frontend (gRPC binds with
    SO_REUSEPORT, so they can share it). ValueError when the host cannot be bound."""
    if server.frontend_processes == 1 or server.port != 0:
        return server
    return dataclasses.replace(server, port=free_port(server.host, "--host"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv, os.environ)
    configure_logging(args.log_format, args.log_level.number)
    try:  # one line and exit code 2, before any worker starts
        server, scheduler, cache, engine_config = configs_from_args(args)
        check_model(server)
        check_port_free(server.address, "--port")
        if server.metrics_port is not None:  # else found busy only once the workers are up, with a traceback
            check_port_free(f"{server.host}:{server.metrics_port}", "--metrics-port")
        server = shared_public_port(server)
    except ValueError as error:  # ModelDirError included
        usage_error(parser, str(error))
    use_short_turns()
    if server.chat_template is not None:
        try:  # here, before any worker starts; the frontend, which renders chats, loads it again
            load_chat_template(server.chat_template)
        except ValueError as error:
            usage_error(parser, f"--chat-template: {error}")
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


def check_model(server: ServerConfig) -> None:
    """Raises ModelDirError unless --model (if given) can be served and --tokenizer (or --model) holds a tokenizer:
    a check of files, so a wrong path fails in milliseconds rather than in a worker after its start."""
    if server.model_dir is None:
        if server.tokenizer_dir is not None:
            raise ModelDirError("--tokenizer needs --model: the built-in model comes with its own tokenizer")
        return
    # External workers load their own copy; this one is still read for its tokenizer.
    check_model_dir(server.model_dir, needs_weights=server.load_format is not LoadFormat.DUMMY
                    and not server.worker_addresses)
    check_tokenizer_dir(server.model_dir, server.tokenizer_dir)
