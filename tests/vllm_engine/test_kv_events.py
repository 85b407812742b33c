"""VllmEngine.SubscribeKvEvents against a real stories260K server with a 48-block pool: stored blocks chained by
parent hash with their tokens, removals after evictions, a reconnecting subscriber that misses nothing, and the
cursor that is no longer (or not yet) kept."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2 as smg
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from pagedserve.v1 import generation_service_pb2_grpc
from tests.e2e.processes import Cluster
from tests.vllm_engine.conftest import BLOCK_SIZE, NUM_GPU_BLOCKS, run_against

pytestmark = pytest.mark.e2e

VllmStub = vllm_engine_pb2_grpc.VllmEngineStub
OursStub = generation_service_pb2_grpc.GenerationServiceStub
PROMPT_BLOCKS = 12  # full blocks per prompt: four prompts hold the whole pool, a fifth evicts


def _prompt(seed: int) -> list[int]:
    return random.Random(seed).choices(range(3, 512), k=PROMPT_BLOCKS * BLOCK_SIZE + 1)


async def _generate(stub: VllmStub, prompt: list[int]) -> None:
    request = vllm.GenerateRequest(request_id=f"kv-{prompt[0]}", tokenized=vllm.TokenizedInput(input_ids=prompt),
                                   sampling_params=vllm.SamplingParams(temperature=0, max_tokens=1))
    _ = [r async for r in stub.Generate(request)]


async def _read_until(call: grpc.aio.UnaryStreamCall[smg.SubscribeKvEventsRequest, smg.KvEventBatch],
                      done: object, batches: list[smg.KvEventBatch]) -> None:
    """Reads batches into `batches` until done(batches) or 10 s of silence."""
    assert callable(done)
    while not done(batches):
        batch = await asyncio.wait_for(call.read(), 10)
        assert isinstance(batch, smg.KvEventBatch), "the stream ended"
        batches.append(batch)


def _stored(batches: list[smg.KvEventBatch]) -> list[tuple[int | None, smg.KvBlock]]:
    """(parent hash, block) of every stored block, a chain's later blocks with their predecessor as parent."""
    blocks: list[tuple[int | None, smg.KvBlock]] = []
    for batch in batches:
        for event in batch.events:
            if event.HasField("stored"):
                parent = event.stored.parent_block_hash if event.stored.HasField("parent_block_hash") else None
                for block in event.stored.blocks:
                    blocks.append((parent, block))
                    parent = block.block_hash
    return blocks


def _removed(batches: list[smg.KvEventBatch]) -> set[int]:
    return {h for b in batches for e in b.events if e.HasField("removed") for h in e.removed.block_hashes}


def test_stored_blocks_carry_their_tokens_and_chain_by_parent_then_evictions_remove_them(server: Cluster) -> None:
    prompts = [_prompt(seed) for seed in range(100, 105)]

    async def scenario(stub: VllmStub, ours: OursStub) -> list[smg.KvEventBatch]:
        call = stub.SubscribeKvEvents(smg.SubscribeKvEventsRequest(start_sequence_number=0))
        batches: list[smg.KvEventBatch] = []
        await _generate(stub, prompts[0])
        await _read_until(call, lambda got: len(_stored(got)) >= PROMPT_BLOCKS
                          and _stored(got)[-1][1].token_ids == prompts[0][-BLOCK_SIZE - 1:-1], batches)
        for prompt in prompts[1:]:
            await _generate(stub, prompt)
        first_hashes = {b.block_hash for _, b in _stored(batches)[-PROMPT_BLOCKS:]}
        await _read_until(call, lambda got: first_hashes <= _removed(got), batches)
        call.cancel()
        return batches

    batches = run_against(server.address, scenario)
    numbers = [b.sequence_number for b in batches if not b.HasField("snapshot")]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gap, no repeat
    expected_blocks = [prompts[0][i:i + BLOCK_SIZE] for i in range(0, PROMPT_BLOCKS * BLOCK_SIZE, BLOCK_SIZE)]
    first = [(parent, block) for parent, block in _stored(batches) if list(block.token_ids) in expected_blocks]
    assert [list(block.token_ids) for _, block in first] == expected_blocks
    assert first[0][0] is None  # a prompt's first block has no parent
    assert [parent for parent, _ in first[1:]] == [block.block_hash for _, block in first[:-1]]
    assert all(block.block_size == BLOCK_SIZE for _, block in first)
    assert len({b.block_hash for _, b in _stored(batches)} - _removed(batches)) <= NUM_GPU_BLOCKS


def test_reconnecting_subscriber_misses_nothing(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> tuple[list[smg.KvEventBatch], list[smg.KvEventBatch]]:
        whole = stub.SubscribeKvEvents(smg.SubscribeKvEventsRequest(start_sequence_number=0))
        seen: list[smg.KvEventBatch] = []
        await _generate(stub, _prompt(200))
        await _read_until(whole, lambda got: any(not b.HasField("snapshot") for b in got), seen)
        cursor = seen[-1].sequence_number
        for seed in (201, 202):  # while the other subscriber is away
            await _generate(stub, _prompt(seed))
        await _read_until(whole, lambda got: len(_stored(got)) >= 3 * PROMPT_BLOCKS, seen)
        again = stub.SubscribeKvEvents(smg.SubscribeKvEventsRequest(start_sequence_number=cursor))
        resumed: list[smg.KvEventBatch] = []
        last = seen[-1].sequence_number
        await _read_until(again, lambda got: bool(got) and got[-1].sequence_number >= last, resumed)
        whole.cancel()
        again.cancel()
        return [b for b in seen if b.sequence_number >= cursor and not b.HasField("snapshot")], resumed

    expected, resumed = run_against(server.address, scenario)
    assert resumed[0].sequence_number == expected[0].sequence_number
    assert [(b.sequence_number, list(b.events)) for b in resumed] == [(b.sequence_number, list(b.events))
                                                                      for b in expected]


def test_cursor_beyond_the_engines_batches_is_out_of_range(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        call = stub.SubscribeKvEvents(smg.SubscribeKvEventsRequest(start_sequence_number=10**9))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "resubscribe from 0" in (error.details() or "")
