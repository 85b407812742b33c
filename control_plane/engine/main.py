"""`pagedserve serve`: flags and PAGEDSERVE_* variables -> configs, checked; then serving.py runs the server.

Only what the flags and their checks need is imported here, so a wrong flag or model path fails with one line
before the engine, the tokenizer library and the workers are loaded (serving.py is imported after the checks)."""

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
from pagedserve.control_plane.engine.worker_security import cluster_secret_from_args, worker_channel_security_from_args
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.runtime.auth import SECRET_ENV
from pagedserve.runtime.flags import EPILOG, parse_args, usage_error
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import add_log_flags, configure_logging
from pagedserve.runtime.port_check import check_port_free, free_port

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
                   help=f"GiB of KV pool per worker; on a GPU it replaces --gpu-memory-utilization's sizing (vLLM's "
                        f"--kv-cache-memory-bytes) and is refused unless it fits (default: GPU, by utilization; CPU, "
                        f"what --max-num-seqs sequences of --max-model-len tokens need, at most "
                        f"{CPU_KV_CACHE_CAP_BYTES / _GIB:g} unless one sequence needs more)")
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
        from pagedserve.control_plane.text.chat_template import load_chat_template  # the tokenizer library

        try:  # here, before any worker starts; the frontend, which renders chats, loads it again
            load_chat_template(server.chat_template)
        except ValueError as error:
            usage_error(parser, f"--chat-template: {error}")
    supervision = supervisor_config_from_args(args, server)
    secret = cluster_secret_from_args(parser, args)
    security = worker_channel_security_from_args(parser, args)
    from pagedserve.control_plane.engine.serving import serve  # the engine, the tokenizer library: after the checks

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
