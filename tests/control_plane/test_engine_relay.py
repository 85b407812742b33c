"""The relay between the frontend and the engine process: EngineService in-process on a Unix socket, a real
engine over a fake worker, and the frontend's EngineClient reading every request's chunks from one stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from pagedserve.contract.codec import token_ids_to_bytes
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.control_plane.config import EngineConfig
from pagedserve.control_plane.engine.engine import Engine
from pagedserve.control_plane.engine.metrics import EngineMetrics
from pagedserve.control_plane.engine.service import EngineServicer, build_engine_server
from pagedserve.control_plane.errors import AlreadyExistsError, EngineUnavailableError, NeverFitsError
from pagedserve.control_plane.frontend.engine_client import EngineClient, merge_chunks
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2
from pagedserve.v1.engine_service_pb2 import (
    REQUEST_ERROR_KIND_INVALID_ARGUMENT,
    AddCommand,
    RelayCommand,
    RelayRequest,
    RelayResponse,
    RequestError,
)
from pagedserve.v1.engine_service_pb2_grpc import EngineServiceStub
from tests.control_plane.factories import FakeWorker, make_scheduler, make_worker

NUM_BLOCKS, BLOCK_SIZE = 256, 4
STEP_S = 0.001
LONG = 1000  # tokens: a request this long is still running seconds after it started
T = TypeVar("T")


class _FakeTransport:
    """The fake worker behind the engine's StepTransport: a step takes STEP_S, as on a device."""

    def __init__(self, worker: FakeWorker) -> None:
        self._worker = worker
        self._results: asyncio.Queue[StepResult] = asyncio.Queue()

    async def send(self, plan: StepPlan) -> None:
        self._results.put_nowait(self._worker.execute(plan))

    async def receive(self) -> StepResult:
        await asyncio.sleep(STEP_S)
        return await self._results.get()


@dataclass
class _Relay:
    engine: Engine
    client: EngineClient


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _engine(tokenizer: Tokenizer) -> Engine:
    scheduler = make_scheduler(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    transport = _FakeTransport(make_worker(scheduler))
    return Engine([("w0", scheduler, transport)], tokenizer, EngineConfig(), EngineMetrics("fake", 2048))


_MODEL = ServedModel(name="fake", architecture="LlamaForCausalLM", dtype="float32", vocab_size=32000,
                     max_model_len=1024, block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS, num_workers=1,
                     eos_token_ids=(2,))


class _LaggingServicer(EngineServicer):
    """Holds each relay message back for a few steps, so chunks are on their way when a client leaves."""

    async def Relay(  # noqa: N802
        self,
        request_iterator: AsyncIterator[RelayRequest],
        context: grpc.aio.ServicerContext[RelayRequest, RelayResponse],
    ) -> AsyncIterator[RelayResponse]:
        async for response in super().Relay(request_iterator, context):
            await asyncio.sleep(10 * STEP_S)
            yield response


@asynccontextmanager
async def _relay(tokenizer: Tokenizer, socket_dir: Path, servicer: type[EngineServicer] = EngineServicer,
                 ) -> AsyncIterator[_Relay]:
    engine = _engine(tokenizer)
    engine.start()
    address = f"unix:{socket_dir / 'engine.sock'}"
    server = await build_engine_server(servicer(engine, _MODEL), address)
    await server.start()
    client = EngineClient(address)
    client.start()
    try:
        yield _Relay(engine, client)
    finally:
        await client.close()
        await server.stop(grace=None)
        await engine.stop()


def _params(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


async def _collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def _until(condition: Callable[[], bool]) -> None:
    """Lets the engine and the relay run until condition holds (five seconds at most)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


def _run(tokenizer: Tokenizer, tmp_path: Path, scenario: Callable[[_Relay], Awaitable[T]],
         servicer: type[EngineServicer] = EngineServicer) -> T:
    async def body() -> T:
        async with _relay(tokenizer, tmp_path, servicer) as relay:
            return await scenario(relay)

    return asyncio.run(body())


def test_each_request_streams_the_tokens_the_engine_gives_it_directly_numbered_with_usage_last(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    prompts = [(1, 450, 1701), (1, 319, 4086, 29889, 13)]

    async def relayed(relay: _Relay) -> list[list[generation_service_pb2.GenerateResponse]]:
        request_ids = [relay.client.add_request(prompt, _params(12)) for prompt in prompts]
        return list(await asyncio.gather(*(_collect(relay.client.stream(rid)) for rid in request_ids)))

    async def direct() -> list[list[int]]:
        engine = _engine(tokenizer)
        engine.start()
        request_ids = [engine.add_request(prompt, SamplingParams(max_tokens=12, ignore_eos=True)) for prompt in prompts]
        streams = await asyncio.gather(*(_collect(engine.stream(rid)) for rid in request_ids))
        await engine.stop()
        return [[t for item in stream for t in item.chunk.token_ids] for stream in streams]

    streams = _run(tokenizer, tmp_path, relayed)
    assert [[t for chunk in stream for t in chunk.token_ids] for stream in streams] == asyncio.run(direct())
    for stream in streams:
        assert [chunk.sequence_number for chunk in stream] == list(range(len(stream)))
        assert [chunk.HasField("usage") for chunk in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].usage.completion_tokens == 12
        assert stream[-1].finish_reason == generation_service_pb2.FINISH_REASON_LENGTH


def test_the_engine_counts_a_relayed_request_from_its_arrival_at_the_frontend(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(relay: _Relay) -> float | None:
        arrival = time.monotonic() - 5.0  # the frontend received it 5 s before relaying it
        await _collect(relay.client.stream(relay.client.add_request((1, 450), _params(2), arrival_time_s=arrival)))
        return relay.engine.metrics.registry.get_sample_value(
            "pagedserve:time_to_first_token_seconds_sum", {"model_name": "fake"})

    ttft = _run(tokenizer, tmp_path, scenario)
    assert ttft is not None and 5.0 <= ttft < 60.0


def test_a_client_that_leaves_early_aborts_its_request_and_frees_its_blocks(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(relay: _Relay) -> tuple[int, int, int]:
        request_id = relay.client.add_request((1, 450, 1701), _params(LONG))
        stream = relay.client.stream(request_id)
        await anext(stream)
        used_while_running = relay.engine.status().num_used_blocks
        await stream.aclose()
        await _until(lambda: relay.engine.status().num_requests_running == 0)
        status = relay.engine.status()
        return used_while_running, status.num_used_blocks, status.num_generation_tokens

    used_while_running, used_after, num_generated = _run(tokenizer, tmp_path, scenario)
    assert used_while_running > 0
    assert used_after == 0
    assert num_generated < LONG // 2


def test_a_request_id_reused_after_its_client_left_gets_only_its_own_chunks(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(relay: _Relay) -> list[generation_service_pb2.GenerateResponse]:
        first = relay.client.stream(relay.client.add_request((1, 450, 1701), _params(LONG), request_id="x"))
        for _ in range(3):
            await anext(first)
        await first.aclose()  # the engine keeps computing it until the abort arrives
        return await _collect(relay.client.stream(relay.client.add_request((1, 319), _params(4), request_id="x")))

    chunks = _run(tokenizer, tmp_path, scenario, _LaggingServicer)
    assert {chunk.request_id for chunk in chunks} == {"x"}
    assert sum(len(chunk.token_ids) for chunk in chunks) == 4
    assert chunks[-1].usage.completion_tokens == 4


def test_each_completion_of_a_parallel_request_is_numbered_on_its_own(tokenizer: Tokenizer, tmp_path: Path) -> None:
    async def scenario(relay: _Relay) -> list[generation_service_pb2.GenerateResponse]:
        params = _params(5)
        params.n = 2
        return await _collect(relay.client.stream(relay.client.add_request((1, 450, 1701), params)))

    chunks = _run(tokenizer, tmp_path, scenario)
    for index in (0, 1):
        mine = [chunk for chunk in chunks if chunk.index == index]
        assert [chunk.sequence_number for chunk in mine] == list(range(len(mine)))
        assert sum(len(chunk.token_ids) for chunk in mine) == 5
    assert [chunk.HasField("usage") for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == 10


def test_a_request_the_engine_rejects_fails_its_stream_with_the_engine_error_and_nothing_allocated(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    too_long = tuple(range(3, 3 + NUM_BLOCKS * BLOCK_SIZE))  # its KV fills the pool; two new tokens would not fit

    async def scenario(relay: _Relay) -> tuple[str, int]:
        params = _params(4)
        params.min_tokens = 2
        request_id = relay.client.add_request(too_long, params)
        with pytest.raises(NeverFitsError) as raised:
            async for _ in relay.client.stream(request_id):
                pass
        return str(raised.value), relay.engine.status().num_used_blocks

    message, used = _run(tokenizer, tmp_path, scenario)
    assert message == (f"the request can never fit: a prompt of {len(too_long)} tokens and min_tokens 2 need "
                       f"{NUM_BLOCKS + 1} KV blocks of {BLOCK_SIZE} tokens, and the largest worker's pool has "
                       f"{NUM_BLOCKS}; shorten the prompt (retrying does not help)")
    assert used == 0


def test_an_add_command_with_a_partial_token_id_fails_that_request_naming_the_field_and_the_next_one_runs(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    """Token ids travel as 4-byte little-endian ids (contract.codec); five bytes are not whole ids."""
    async def scenario(relay: _Relay) -> tuple[list[RequestError], list[str], int]:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'engine.sock'}") as channel:
            stream = EngineServiceStub(channel).Relay()
            commands = [
                RelayCommand(add=AddCommand(request_id=request_id, prompt_token_ids=ids, sampling_params=_params(2)))
                for request_id, ids in (("partial", b"\x01\x00\x00\x00\x02"), ("whole", token_ids_to_bytes([1, 450])))
            ]
            await stream.write(RelayRequest(commands=commands))
            errors: list[RequestError] = []
            finished: list[str] = []
            while "whole" not in finished:
                response = await stream.read()
                errors += response.errors
                finished += [chunk.request_id for chunk in response.responses if chunk.HasField("usage")]
            await stream.done_writing()
        return errors, finished, relay.engine.status().num_used_blocks

    errors, finished, used = _run(tokenizer, tmp_path, scenario)
    assert [(e.request_id, e.kind) for e in errors] == [("partial", REQUEST_ERROR_KIND_INVALID_ARGUMENT)]
    assert errors[0].message == "prompt_token_ids: must be 4-byte token ids, got 5 bytes"
    assert finished == ["whole"]
    assert used == 0


def test_a_frontend_that_disconnects_has_every_request_it_left_open_aborted(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(relay: _Relay) -> tuple[int, int, int]:
        request_ids = [relay.client.add_request((1, 450 + i), _params(LONG)) for i in range(3)]
        await anext(relay.client.stream(request_ids[0]))
        running = relay.engine.status().num_requests_running
        await relay.client.close()
        await _until(lambda: relay.engine.status().num_requests_running == 0)
        status = relay.engine.status()
        return running, status.num_used_blocks, status.num_generation_tokens

    running, used_after, num_generated = _run(tokenizer, tmp_path, scenario)
    assert running == 3
    assert used_after == 0
    assert num_generated < LONG


def test_open_streams_fail_as_unavailable_when_the_engine_process_goes_away(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario() -> tuple[str, bool]:
        address = f"unix:{tmp_path / 'engine.sock'}"
        server = await build_engine_server(EngineServicer(_engine(tokenizer), _MODEL), address)
        await server.start()
        client = EngineClient(address)
        client.start()
        request_id = client.add_request((1, 450), _params(4))  # the engine loop never runs: no chunk comes
        stream = client.stream(request_id)
        pending = asyncio.ensure_future(anext(stream))
        await server.stop(grace=None)
        with pytest.raises(EngineUnavailableError) as raised:
            await pending
        await client.close()
        return str(raised.value), client.closed.is_set()

    message, closed = asyncio.run(scenario())
    assert message == "the engine process is unavailable"
    assert closed


def test_a_live_request_id_is_refused_and_free_again_once_its_request_ended(
    tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    async def scenario(relay: _Relay) -> tuple[str, int, list[str]]:
        first = relay.client.stream(relay.client.add_request((1, 450), _params(4), request_id="r"))
        await anext(first)
        with pytest.raises(AlreadyExistsError) as raised:
            relay.client.add_request((1, 319), _params(4), request_id="r")
        rest = await _collect(first)
        again = await _collect(relay.client.stream(relay.client.add_request((1, 319), _params(2), request_id="r")))
        return str(raised.value), rest[-1].usage.completion_tokens, [chunk.request_id for chunk in again]

    message, first_tokens, again_ids = _run(tokenizer, tmp_path, scenario)
    assert message == "request_id: 'r' is in use by a request that has not ended"
    assert first_tokens == 4  # the refused duplicate took nothing from the first
    assert set(again_ids) == {"r"}


def test_a_generated_request_id_never_takes_one_a_client_chose(tokenizer: Tokenizer, tmp_path: Path) -> None:
    async def scenario(relay: _Relay) -> list[str]:
        return [relay.client.add_request([1, 2, 3], _params(2), request_id) for request_id in ("req-0", "", "")]

    ids = _run(tokenizer, tmp_path, scenario)
    assert ids[0] == "req-0"
    assert len(set(ids)) == 3


def test_the_engine_refuses_a_live_request_id_and_generates_fresh_ones(tokenizer: Tokenizer) -> None:
    engine = _engine(tokenizer)
    params = SamplingParams(max_tokens=2)
    ids = [engine.add_request((1, 2, 3), params, request_id) for request_id in ("req-0", "q", "")]
    with pytest.raises(AlreadyExistsError, match="request_id: 'q' is in use by a request that has not ended"):
        engine.add_request((1, 2, 3), params, "q")

    assert ids[:2] == ["req-0", "q"]
    assert len(set(ids)) == 3
    assert engine.status().num_requests_waiting == 3


def _chunk(index: int, token_ids: list[int], text: str, finish: bool = False,
           usage: bool = False) -> generation_service_pb2.GenerateResponse:
    chunk = generation_service_pb2.GenerateResponse(request_id="r", index=index, token_ids=token_ids, text=text)
    if finish:
        chunk.finish_reason = generation_service_pb2.FINISH_REASON_LENGTH
    if usage:
        chunk.usage.completion_tokens = 7
    return chunk


def test_prompt_logprobs_of_prefill_chunks_that_arrived_together_are_all_kept() -> None:
    # Chunked prefill sends each chunk's prompt logprobs in its own message.
    first, second = _chunk(0, [], ""), _chunk(0, [], "")
    first.prompt_logprobs.add(token_id=1, logprob=-0.5)
    second.prompt_logprobs.add(token_id=2, logprob=-1.5)
    second.prompt_logprobs.add(token_id=3, logprob=-2.5)

    (merged,) = merge_chunks([first, second])

    assert [p.token_id for p in merged.prompt_logprobs] == [1, 2, 3]


def test_chunks_that_arrived_together_merge_per_completion_keeping_the_last_one_last() -> None:
    merged = merge_chunks([
        _chunk(0, [5], "a"), _chunk(1, [6], "b"), _chunk(0, [7], "c"), _chunk(1, [8, 9], "de"),
        _chunk(0, [10], "f", finish=True), _chunk(1, [11], "g", finish=True, usage=True),
    ])
    assert [(c.index, list(c.token_ids), c.text) for c in merged] == [
        (0, [5, 7, 10], "acf"), (1, [6, 8, 9, 11], "bdeg"),
    ]
    assert [c.finish_reason for c in merged] == [generation_service_pb2.FINISH_REASON_LENGTH] * 2
    assert [c.HasField("usage") for c in merged] == [False, True]
    assert merged[1].usage.completion_tokens == 7
