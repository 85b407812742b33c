"""The frontend process of `pagedserve serve`: the public gRPC server, tokenization and the clients' streams.

`pagedserve serve` starts it once its engine listens (frontend_launcher.py). Client
streams cost the process that sends them tens of microseconds per message; here they do not slow the engine's
loop, which plans steps and exchanges them with the workers (docs/architecture.md, "Two control-plane
processes"). Wiring only.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import structlog

from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import GenerationServicer, build_server
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.collector import freeze_startup_objects
from pagedserve.runtime.gil import use_short_turns
from pagedserve.runtime.logs import LogFormat, configure_logging
from pagedserve.runtime.stop_signal import stopped_by_signal

log = structlog.get_logger()

_ENGINE_ANSWER_TIMEOUT_S = 60.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pagedserve.control_plane.frontend.main",
                                description="The public server of `pagedserve serve` (started by it).")
    p.add_argument("--engine", required=True, help="the engine process's EngineService address")
    p.add_argument("--model", type=Path, required=True, help="model directory (its tokenizer)")
    p.add_argument("--listen", required=True, help="public HOST:PORT")
    p.add_argument("--log-format", default="auto", choices=[f.value for f in LogFormat])
    return p


async def run_frontend(engine_address: str, model_dir: Path, address: str) -> int:
    """Serves until SIGINT/SIGTERM (0) or until the engine process goes away (1)."""
    engine = EngineClient(engine_address)
    model = await engine.describe(_ENGINE_ANSWER_TIMEOUT_S)
    tokenizer = Tokenizer(model_dir)
    engine.start()
    server, port = await build_server(GenerationServicer(engine, tokenizer, model), address)
    await server.start()
    freeze_startup_objects()
    log.info("server_listening", address=f"{address.rsplit(':', 1)[0]}:{port}", model=model.name,
             max_model_len=model.max_model_len, num_gpu_blocks=model.num_gpu_blocks)
    stopped = await stopped_by_signal(engine.closed.wait())
    log.info("server_stopping")
    await server.stop(grace=5.0)
    await engine.close()
    return 0 if stopped else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(LogFormat(args.log_format))
    use_short_turns()
    return asyncio.run(run_frontend(args.engine, args.model, args.listen))


if __name__ == "__main__":
    raise SystemExit(main())
