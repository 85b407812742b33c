"""Admission through the whole in-process stack (public server, relay, engine over fake workers): a request no
worker's pool can ever hold is refused at once and marked not to be retried; one that fits only some pools goes
to those; a live request id is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from pagedserve.clients.client import PagedServeClient
from pagedserve.clients.errors import PagedServeClientError, ResourceExhausted
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.errors import NeverFitsError, WorkerUnavailableError
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import GenerationServicer, build_server
from pagedserve.control_plane.scheduling.scheduler import Scheduler
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.control_plane.engine_fakes import _Transport, _until
from tests.control_plane.factories import make_scheduler, make_worker

BLOCK_SIZE = 4
POOLS = {"small": 8, "large": 16}  # blocks per worker: the largest holds a sequence of 16 * 4 + 1 = 65 tokens
PROMPT = tuple(range(10, 20))
HUGE_PROMPT = tuple(range(10, 80))  # 70 tokens: with its first new token, 18 blocks
LONG_PROMPT = tuple(range(10, 50))  # 40 tokens: 10 blocks, only the large pool holds it
T = TypeVar("T")


@dataclass
class _Stack:
    engine: Engine
    schedulers: dict[str, Scheduler]
    transports: dict[str, _Transport]
    address: str  # the public server's
    num_adds: list[int]  # requests the engine was asked to admit, one entry per try


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _engine(tokenizer: Tokenizer) -> tuple[Engine, dict[str, Scheduler], dict[str, _Transport]]:
    """An engine over one fake worker per POOLS entry (not started)."""
    schedulers = {worker_id: make_scheduler(num_blocks=num_blocks, block_size=BLOCK_SIZE)
                  for worker_id, num_blocks in POOLS.items()}
    transports = {worker_id: _Transport(make_worker(scheduler)) for worker_id, scheduler in schedulers.items()}
    lanes = [(worker_id, schedulers[worker_id], transports[worker_id]) for worker_id in POOLS]
    return Engine(lanes, tokenizer, EngineConfig(), EngineMetrics("fake")), schedulers, transports


@asynccontextmanager
async def _stack(tokenizer: Tokenizer, socket_dir: Path) -> AsyncIterator[_Stack]:
    engine, schedulers, transports = _engine(tokenizer)
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
        yield _Stack(engine, schedulers, transports, f"127.0.0.1:{port}", num_adds)
    finally:
        await public.stop(grace=None)
        await client.close()
        await engine_server.stop(grace=None)
        await engine.stop()


def _run(tokenizer: Tokenizer, tmp_path: Path, scenario: Callable[[_Stack], Awaitable[T]]) -> T:
    async def body() -> T:
        async with _stack(tokenizer, tmp_path) as stack:
            return await scenario(stack)

    return asyncio.run(body())


def _request(max_tokens: int, prompt: tuple[int, ...] = PROMPT) -> generation_service_pb2.GenerateRequest:
    request = generation_service_pb2.GenerateRequest(
        sampling_params=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    request.token_ids.ids.extend(prompt)
    return request


NEVER_FITS_MESSAGE = ("the request can never fit: a prompt of 70 tokens needs 18 KV blocks of 4 tokens, and the "
                      "largest worker's pool has 16; shorten the prompt (retrying does not help)")


def test_a_request_no_pool_can_hold_is_refused_with_a_do_not_retry_trailer(tokenizer: Tokenizer,
                                                                          tmp_path: Path) -> None:
    async def scenario(stack: _Stack) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...], int]:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            call = generation_service_pb2_grpc.GenerationServiceStub(channel).Generate(_request(4, HUGE_PROMPT),
                                                                                      timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
        error = raised.value
        return error.code(), error.details() or "", tuple(error.trailing_metadata() or ()), \
            stack.engine.status().num_used_blocks

    code, details, trailers, num_used = _run(tokenizer, tmp_path, scenario)
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NEVER_FITS_MESSAGE)
    assert ("grpc-retry-pushback-ms", "-1") in trailers
    assert num_used == 0


def test_the_client_does_not_retry_a_request_that_can_never_fit(tokenizer: Tokenizer, tmp_path: Path) -> None:
    async def scenario(stack: _Stack) -> tuple[str, int, float]:
        started = time.monotonic()
        async with PagedServeClient(stack.address, max_retries=3, backoff_s=1.0) as client:
            with pytest.raises(ResourceExhausted) as raised:
                await client.generate(HUGE_PROMPT, _request(4).sampling_params)
        return raised.value.message, len(stack.num_adds), time.monotonic() - started

    message, num_adds, elapsed_s = _run(tokenizer, tmp_path, scenario)
    assert (message, num_adds) == (NEVER_FITS_MESSAGE, 1)
    assert elapsed_s < 0.5  # a single backoff of this client would take at least 0.5 s


def test_a_request_that_fits_only_the_larger_pool_goes_there_though_it_is_busier(tokenizer: Tokenizer) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        engine, schedulers, _ = _engine(tokenizer)
        engine.start()
        try:
            busy = engine.add_request(PROMPT, SamplingParams(max_tokens=4))  # the least loaded first: small
            ids = [engine.add_request(PROMPT, SamplingParams(max_tokens=30)) for _ in range(2)]  # 10 blocks each
            placed = {worker_id: [i for i in [busy, *ids] if s.get_request(i) is not None]
                      for worker_id, s in schedulers.items()}
            return placed["small"], placed["large"]
        finally:
            await engine.stop()

    small, large = asyncio.run(scenario())
    assert (small, large) == (["req-0"], ["req-1", "req-2"])


def test_a_request_only_a_dead_worker_could_hold_is_unavailable_and_one_none_could_hold_never_fits(
    tokenizer: Tokenizer,
) -> None:
    async def scenario() -> tuple[str, str]:
        engine, _, transports = _engine(tokenizer)
        engine.start()
        try:
            transports["large"].end_stream()
            await _until(lambda: engine.status().num_total_blocks == POOLS["small"])
            with pytest.raises(WorkerUnavailableError) as unavailable:
                engine.add_request(LONG_PROMPT, SamplingParams(max_tokens=4))
            with pytest.raises(NeverFitsError) as never:
                engine.add_request(HUGE_PROMPT, SamplingParams(max_tokens=4))
            engine.add_request(PROMPT, SamplingParams(max_tokens=30))  # cut short by the small pool, yet it fits
            return str(unavailable.value), str(never.value)
        finally:
            await engine.stop()

    unavailable, never = asyncio.run(scenario())
    assert unavailable == ("no serving worker's KV pool holds the request; the workers whose pools do are down "
                           "(retry later)")
    assert never == NEVER_FITS_MESSAGE


def test_a_live_request_id_is_already_exists_and_free_again_once_its_request_ended(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(stack: _Stack) -> tuple[grpc.StatusCode, str, int, int]:
        async with PagedServeClient(stack.address, max_retries=0) as client:
            first = client.generate_stream(PROMPT, _request(40).sampling_params, request_id="dup")
            await anext(first)
            with pytest.raises(PagedServeClientError) as raised:
                await anext(client.generate_stream(PROMPT, _request(4).sampling_params, request_id="dup"))
            rest = [chunk async for chunk in first]
            again = [chunk async for chunk in client.generate_stream(PROMPT, _request(3).sampling_params,
                                                                     request_id="dup")]
        return raised.value.code, raised.value.message, rest[-1].usage.completion_tokens, \
            again[-1].usage.completion_tokens

    code, message, first_tokens, again_tokens = _run(tokenizer, tmp_path, scenario)
    assert (code, message) == (grpc.StatusCode.ALREADY_EXISTS,
                               "request_id: 'dup' is in use by a request that has not ended")
    assert (first_tokens, again_tokens) == (40, 3)
