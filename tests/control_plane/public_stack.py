"""The whole control plane in one process for tests: the public server, the relay on a Unix socket and a real
engine over one fake worker per POOLS entry, each with a KV pool of its own size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import GenerationServicer, build_server
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.control_plane.engine_fakes import _Transport
from tests.control_plane.factories import make_scheduler, make_worker

BLOCK_SIZE = 4
POOLS = {"small": 8, "large": 16}  # blocks per worker: the largest holds a sequence of 16 * 4 + 1 = 65 tokens
T = TypeVar("T")


@dataclass
class Stack:
    """The engine and its fake workers' schedulers and transports, by worker id; the public server's address."""

    engine: Engine
    schedulers: dict[str, Scheduler]
    transports: dict[str, _Transport]
    address: str  # the public server's
    num_adds: list[int]  # requests the engine was asked to admit, one entry per try


def make_engine(tokenizer: Tokenizer) -> tuple[Engine, dict[str, Scheduler], dict[str, _Transport]]:
    """An engine over one fake worker per POOLS entry (not started)."""
    schedulers = {worker_id: make_scheduler(num_blocks=num_blocks, block_size=BLOCK_SIZE)
                  for worker_id, num_blocks in POOLS.items()}
    transports = {worker_id: _Transport(make_worker(scheduler)) for worker_id, scheduler in schedulers.items()}
    lanes = [(worker_id, schedulers[worker_id], transports[worker_id]) for worker_id in POOLS]
    return Engine(lanes, tokenizer, EngineConfig(), EngineMetrics("fake", 2048)), schedulers, transports


@asynccontextmanager
async def public_stack(tokenizer: Tokenizer, socket_dir: Path) -> AsyncIterator[Stack]:
    """The stack, serving until the block ends; the engine's add_request counts its calls in num_adds."""
    engine, schedulers, transports = make_engine(tokenizer)
    num_adds: list[int] = []
    admit = engine.add_request

    def counted_admit(*args: Any, **kwargs: Any) -> str:
        num_adds.append(1)
        return admit(*args, **kwargs)

    engine.add_request = counted_admit  # type: ignore[method-assign]
    engine.start()
    model = ServedModel(name="fake", architecture="LlamaForCausalLM", dtype="float32", vocab_size=32000,
                        max_model_len=1024, block_size=BLOCK_SIZE, num_gpu_blocks=sum(POOLS.values()),
                        num_workers=len(POOLS), eos_token_ids=(2,))
    engine_address = f"unix:{socket_dir / 'engine.sock'}"
    engine_server = await build_engine_server(EngineServicer(engine, model), engine_address)
    await engine_server.start()
    client = EngineClient(engine_address)
    client.start()
    public, port = await build_server(GenerationServicer(client, tokenizer, model), "127.0.0.1:0")
    await public.start()
    try:
        yield Stack(engine, schedulers, transports, f"127.0.0.1:{port}", num_adds)
    finally:
        await public.stop(grace=None)
        await client.close()
        await engine_server.stop(grace=None)
        await engine.stop()


def run_stack(tokenizer: Tokenizer, tmp_path: Path, scenario: Callable[[Stack], Awaitable[T]]) -> T:
    async def body() -> T:
        async with public_stack(tokenizer, tmp_path) as stack:
            return await scenario(stack)

    return asyncio.run(body())


