"""Admission through the whole in-process stack (public server, relay, engine over fake workers): a request no
worker's pool can ever hold is refused at once and marked not to be retried; one that fits only some pools goes
to those; a live request id is refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from pagedserve.clients.client import PagedServeClient
from pagedserve.clients.errors import PagedServeClientError, ResourceExhausted
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.errors import NeverFitsError, WorkerUnavailableError
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.control_plane.engine_fakes import _until
from tests.control_plane.public_stack import POOLS, Stack, make_engine, run_stack

PROMPT = tuple(range(10, 20))
HUGE_PROMPT = tuple(range(10, 80))  # 70 tokens: with its first new token, 18 blocks
LONG_PROMPT = tuple(range(10, 50))  # 40 tokens: 10 blocks, only the large pool holds it


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def _request(max_tokens: int, prompt: tuple[int, ...] = PROMPT) -> generation_service_pb2.GenerateRequest:
    request = generation_service_pb2.GenerateRequest(
        sampling_params=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    request.token_ids.ids.extend(prompt)
    return request


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


NEVER_FITS_MESSAGE = ("the request can never fit: a prompt of 70 tokens needs 18 KV blocks of 4 tokens, and the "
                      "largest worker's pool has 16; shorten the prompt (retrying does not help)")


def test_a_request_no_pool_can_hold_is_refused_with_a_do_not_retry_trailer(tokenizer: Tokenizer,
                                                                          tmp_path: Path) -> None:
    async def scenario(stack: Stack) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...], int]:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            call = generation_service_pb2_grpc.GenerationServiceStub(channel).Generate(_request(4, HUGE_PROMPT),
                                                                                      timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
        error = raised.value
        return error.code(), error.details() or "", tuple(error.trailing_metadata() or ()), \
            stack.engine.status().num_used_blocks

    code, details, trailers, num_used = run_stack(tokenizer, tmp_path, scenario)
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NEVER_FITS_MESSAGE)
    assert ("grpc-retry-pushback-ms", "-1") in trailers
    assert num_used == 0


def test_the_client_does_not_retry_a_request_that_can_never_fit(tokenizer: Tokenizer, tmp_path: Path) -> None:
    async def scenario(stack: Stack) -> tuple[str, int, float]:
        started = time.monotonic()
        async with PagedServeClient(stack.address, max_retries=3, backoff_s=1.0) as client:
            with pytest.raises(ResourceExhausted) as raised:
                await client.generate(HUGE_PROMPT, _params(4))
        return raised.value.message, len(stack.num_adds), time.monotonic() - started

    message, num_adds, elapsed_s = run_stack(tokenizer, tmp_path, scenario)
    assert (message, num_adds) == (NEVER_FITS_MESSAGE, 1)
    assert elapsed_s < 0.5  # a single backoff of this client would take at least 0.5 s


def test_a_request_that_fits_only_the_larger_pool_goes_there_though_it_is_busier(tokenizer: Tokenizer) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        engine, schedulers, _ = make_engine(tokenizer)
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
        engine, _, transports = make_engine(tokenizer)
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
    async def scenario(stack: Stack) -> tuple[grpc.StatusCode, str, int, int]:
        for transport in stack.transports.values():
            transport.step_s = 0.02  # the first request's 40 steps outlast the duplicate's refusal by far
        async with PagedServeClient(stack.address, max_retries=0) as client:
            first = client.generate_stream(PROMPT, _params(40), request_id="dup")
            await anext(first)
            with pytest.raises(PagedServeClientError) as raised:
                await anext(client.generate_stream(PROMPT, _params(4), request_id="dup"))
            rest = [chunk async for chunk in first]
            again = [chunk async for chunk in client.generate_stream(PROMPT, _params(3), request_id="dup")]
        return raised.value.code, raised.value.message, rest[-1].usage.completion_tokens, \
            again[-1].usage.completion_tokens

    code, message, first_tokens, again_tokens = run_stack(tokenizer, tmp_path, scenario)
    assert (code, message) == (grpc.StatusCode.ALREADY_EXISTS,
                               "request_id: 'dup' is in use by a request that has not ended")
    assert (first_tokens, again_tokens) == (40, 3)
