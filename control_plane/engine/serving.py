"""The server once its flags are checked (main.py): local workers (unless given), each worker's cache sized, the
engine and its schedulers, the engine's socket and the frontend processes, run until a signal, a frontend's exit or
the loss of every worker."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import structlog

from pagedserve.contract.worker_info import CacheRequest, WorkerInfo
from pagedserve.control_plane.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
    WorkerSupervisorConfig,
)
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.model_len import check_model_limit, fit_to_pools
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.engine.worker_client import WorkerConnection
from pagedserve.control_plane.engine.worker_security import WorkerChannelSecurity
from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME
from pagedserve.control_plane.launch.frontend_launcher import FrontendProcess
from pagedserve.control_plane.launch.worker_launcher import LocalWorkers, WorkerLaunchConfig, wait_for_workers
from pagedserve.control_plane.launch.worker_supervisor import LaneSetup, WorkerSupervisor
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.auth import ClusterSecret, ClusterSecretInterceptor
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.cpu_threads import local_worker_threads, usable_cores
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()


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
