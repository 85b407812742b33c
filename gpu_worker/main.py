"""`pagedserve worker`: wiring only. Flags -> WorkerConfig -> loaded worker -> gRPC server until a signal."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import structlog

from pagedserve.contract.model_format import DeviceKind, DType, LoadFormat
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import LogFormat, configure_logging
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()
_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagedserve worker", description="Run a worker holding the model and KV cache.")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT to bind; port 0 picks a free one")
    p.add_argument("--dtype", default=DType.AUTO.value, choices=[m.value for m in DType])
    p.add_argument("--device", default=DeviceKind.AUTO.value, choices=[m.value for m in DeviceKind])
    p.add_argument("--load-format", default=LoadFormat.AUTO.value, choices=[m.value for m in LoadFormat])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-id", default="worker-0")
    p.add_argument("--enforce-eager", action="store_true", help="run every step eagerly, without CUDA graphs")
    p.add_argument("--log-format", default=LogFormat.AUTO.value, choices=[m.value for m in LogFormat])
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model_dir=args.model, dtype=DType(args.dtype), device=DeviceKind(args.device),
        load_format=LoadFormat(args.load_format), seed=args.seed, listen_address=args.listen,
        worker_id=args.worker_id, enforce_eager=args.enforce_eager,
    )


async def serve(worker: Worker, address: str) -> None:
    """Serves until SIGINT or SIGTERM, then stops gracefully (a second signal cuts that short)."""
    server = await start_server(worker, address)
    host = address.rpartition(":")[0]
    log.info("worker_listening", address=f"{host}:{server.port}", worker_id=worker.config.worker_id)
    await stopped_by_signal()
    log.info("worker_stopping", worker_id=worker.config.worker_id)
    await server.stop(_GRACE_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(LogFormat(args.log_format))
    use_short_turns()
    config = config_from_args(args)
    worker = Worker.load(config)
    freeze_startup_objects()
    asyncio.run(serve(worker, config.listen_address))
    return 0
