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

from pagedserve.contract.worker_info import CacheRequest
from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.control_plane.config import (
    CacheConfig,
    EngineConfig,
    PreemptionMode,
    SchedulerConfig,
    SchedulingPolicy,
    ServerConfig,
)
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.launch.frontend_launcher import FrontendProcess
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.runtime.stop_signal import stopped_by_signal
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.control_plane.engine.worker_client import GrpcWorkerClient, WorkerConnection
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig, wait_for_workers
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import LogFormat, configure_logging

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
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--log-format", default="auto", choices=[f.value for f in LogFormat])
    return p


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
            if action.type is not None and action.dest != "worker":
                value = action.type(raw)
            parser.set_defaults(**{action.dest: value})


def configs_from_args(
    args: argparse.Namespace,
) -> tuple[ServerConfig, SchedulerConfig, CacheConfig, EngineConfig]:
    server = ServerConfig(
        host=args.host, port=args.port, model_dir=args.model, worker_addresses=tuple(args.worker),
        num_workers=args.num_workers, dtype=args.dtype, device=args.device, load_format=args.load_format,
        seed=args.seed, metrics_port=args.metrics_port, log_format=LogFormat(args.log_format),
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
    return server, scheduler, cache, EngineConfig(max_steps_in_flight=args.max_steps_in_flight)


async def start_engine(
    workers: Sequence[WorkerConnection], scheduler: SchedulerConfig, cache: CacheConfig, engine_config: EngineConfig,
    model_dir: Path, model_name: str,
) -> tuple[Engine, ServedModel, Tokenizer]:
    """Sizes every worker's cache (which also resets it), builds one scheduler per worker and starts the engine."""
    infos = await asyncio.gather(*(w.get_info() for w in workers))
    init = CacheRequest(
        block_size=cache.block_size, gpu_memory_utilization=cache.gpu_memory_utilization,
        num_gpu_blocks_override=cache.num_gpu_blocks_override, kv_cache_memory_bytes=cache.kv_cache_memory_bytes,
        swap_space_bytes=cache.swap_space_bytes, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        max_num_seqs=scheduler.max_num_seqs, max_model_len=scheduler.max_model_len,
    )
    caches = await asyncio.gather(*(w.init_cache(init) for w in workers))
    info = infos[0]
    max_model_len = min(scheduler.max_model_len or info.max_position_embeddings, info.max_position_embeddings)
    scheduler = dataclasses.replace(scheduler, max_model_len=max_model_len)
    for worker, blocks in zip(infos, caches):
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
        for worker, blocks, connection in zip(infos, caches, workers)
    ]
    engine = Engine(lanes, tokenizer, engine_config, EngineMetrics(model_name))
    engine.start()
    return engine, model, tokenizer


async def serve(server: ServerConfig, scheduler: SchedulerConfig, cache: CacheConfig, engine_config: EngineConfig,
                model_dir: Path, runtime_dir: Path) -> int:
    """Runs workers (unless given), the engine and, beside it, the frontend process with the public server, until
    SIGINT/SIGTERM (0) or until the frontend exits (1). runtime_dir holds the engine's socket."""
    launcher = None
    addresses = list(server.worker_addresses)
    if not addresses:
        launcher = LocalWorkers(WorkerLaunchConfig(
            model_dir=model_dir, num_workers=server.num_workers, dtype=server.dtype, device=server.device,
            load_format=server.load_format, seed=server.seed,
        ))
        addresses = launcher.start()
    clients = [GrpcWorkerClient(address) for address in addresses]
    try:
        await wait_for_workers(clients, server.worker_start_timeout_s, launcher)
        model_name = server.model_dir.name if server.model_dir else BUILTIN_MODEL_NAME
        engine, model, _ = await start_engine(clients, scheduler, cache, engine_config, model_dir, model_name)
        if server.metrics_port is not None:
            engine.metrics.serve(server.host, server.metrics_port)
        engine_address = f"unix:{runtime_dir / 'engine.sock'}"
        engine_server = await build_engine_server(EngineServicer(engine, model), engine_address)
        await engine_server.start()
        frontend = await FrontendProcess.start(engine_address, model_dir, server.address, server.log_format)
        freeze_startup_objects()
        stopped = await stopped_by_signal(frontend.wait())
        if stopped:
            log.info("server_stopping")
            await frontend.stop()
        else:
            log.error("frontend_exited", code=await frontend.wait())
        await engine_server.stop(grace=None)
        await engine.stop()
        await asyncio.gather(*(c.close() for c in clients))
        return 0 if stopped else 1
    finally:
        if launcher is not None:
            launcher.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _env_defaults(parser)
    args = parser.parse_args(argv)
    configure_logging(LogFormat(args.log_format))
    use_short_turns()
    server, scheduler, cache, engine_config = configs_from_args(args)
    with tempfile.TemporaryDirectory(prefix="pagedserve-") as scratch:
        model_dir = server.model_dir
        if model_dir is None:
            model_dir = write_builtin_model(Path(scratch) / BUILTIN_MODEL_NAME)
            server = dataclasses.replace(server, load_format=LoadFormat.DUMMY)
            log.warning("using_builtin_model", model=BUILTIN_MODEL_NAME, weights="deterministic random (dummy)",
                        message=f"no --model given: serving the built-in {BUILTIN_MODEL_NAME}, a small Llama with "
                                "random weights and a locally built tokenizer; its text is not meaningful")
        return asyncio.run(serve(server, scheduler, cache, engine_config, model_dir, Path(scratch)))
