"""One control plane owns a worker at a time: while its Execute stream is open no one else can drive or reset the
worker, and when the stream is lost the worker drops everything until a new control plane calls InitCache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
import pytest

from pagedserve.contract import codec
from pagedserve.contract.model_format import DeviceKind
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.service import WorkerServicer, start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.v1 import worker_service_pb2 as pb
from pagedserve.v1 import worker_service_pb2_grpc
from tests.gpu_worker.harness import STORIES_DIR, greedy

BLOCK_SIZE = 4
NUM_BLOCKS = 16
GOLDEN = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
ExecuteCall = grpc.aio.StreamStreamCall[pb.ExecuteRequest, pb.ExecuteResponse]
Stub = worker_service_pb2_grpc.WorkerServiceStub
Context = grpc.aio.ServicerContext[Any, Any]


def _serve(test: Callable[[grpc.aio.Channel, grpc.aio.Channel, Worker], Awaitable[None]]) -> None:
    """Runs test with two channels (two control planes) to one stories260K CPU worker on a loopback port."""

    async def run() -> None:
        worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU))
        server = await start_server(worker, "127.0.0.1:0")
        try:
            address = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(address) as first, grpc.aio.insecure_channel(address) as second:
                await test(first, second, worker)
        finally:
            await server.stop(0)

    asyncio.run(run())


def _init_cache(num_blocks: int = NUM_BLOCKS) -> pb.InitCacheRequest:
    return pb.InitCacheRequest(block_size=BLOCK_SIZE, num_gpu_blocks_override=num_blocks)


def _prefill() -> pb.ExecuteRequest:
    """Step 0: the golden prompt (5 tokens) as sequence 1 in blocks 0 and 1."""
    prompt = GOLDEN["prompt_ids"]
    new = pb.NewSequence(seq_id=1, prompt_token_ids=codec.token_ids_to_bytes(prompt), sampling_params=greedy(),
                         block_ids=[0, 1], num_computed_tokens=0, num_scheduled_tokens=len(prompt))
    return pb.ExecuteRequest(step_id=0, new_sequences=[new])


def _decode(step_id: int) -> pb.ExecuteRequest:
    """One decode token of sequence 1, within its two blocks (up to 8 tokens)."""
    return pb.ExecuteRequest(step_id=step_id, scheduled_sequences=[pb.ScheduledSequence(seq_id=1,
                                                                                        num_scheduled_tokens=1)])


async def _step(call: ExecuteCall, request: pb.ExecuteRequest) -> int:
    """Sends one step on an open stream and returns the token it sampled."""
    await call.write(request)
    reply = await call.read()
    assert isinstance(reply, pb.ExecuteResponse)
    token_id = codec.step_result_from_proto(reply).outputs[0].token_id
    assert token_id is not None
    return token_id


async def _refusal(call: ExecuteCall) -> grpc.aio.AioRpcError:
    """The status that ends a stream refused on opening (a step is sent too, so a stream accepted fails the test)."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(_step(call, _decode(0)), timeout=10.0)
    return error.value


async def _until_cache_released(stub: Stub) -> None:
    async def poll() -> None:
        while (await stub.GetWorkerInfo(pb.GetWorkerInfoRequest())).is_cache_initialized:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout=5.0)


def test_a_second_execute_is_failed_precondition_and_the_first_stream_keeps_working() -> None:
    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        owner, intruder = Stub(first), Stub(second)
        await owner.InitCache(_init_cache())
        stream = owner.Execute()
        tokens = [await _step(stream, _prefill())]
        refused = await _refusal(intruder.Execute())
        tokens += [await _step(stream, _decode(step_id)) for step_id in (1, 2)]

        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another control plane owns this worker" in (refused.details() or "")
        assert tokens == GOLDEN["greedy_new_ids"][:3]
        stream.cancel()

    _serve(test)


def test_init_cache_while_a_stream_is_open_is_failed_precondition_and_changes_nothing() -> None:
    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        owner, intruder = Stub(first), Stub(second)
        await owner.InitCache(_init_cache())
        stream = owner.Execute()
        tokens = [await _step(stream, _prefill())]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await intruder.InitCache(_init_cache(num_blocks=1))
        num_blocks, seq_ids = worker.pool.num_gpu_blocks, set(worker.registry.states)
        tokens += [await _step(stream, _decode(step_id)) for step_id in (1, 2)]

        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "InitCache refused" in (refused.value.details() or "")
        assert (num_blocks, seq_ids) == (NUM_BLOCKS, {1})
        assert tokens == GOLDEN["greedy_new_ids"][:3]
        stream.cancel()

    _serve(test)


def test_a_lost_stream_drops_every_sequence_and_block_until_init_cache_runs_again() -> None:
    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        owner, successor = Stub(first), Stub(second)
        await owner.InitCache(_init_cache())
        stream = owner.Execute()
        await _step(stream, _prefill())
        stream.cancel()  # the control plane is gone
        await _until_cache_released(successor)
        refused = await _refusal(successor.Execute())

        assert not worker.is_cache_initialized  # pool, registry and runner dropped: no sequence, no block held
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.details() == "InitCache must run before Execute"

    _serve(test)


def test_a_new_control_plane_takes_over_a_worker_whose_owner_was_lost() -> None:
    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        owner, successor = Stub(first), Stub(second)
        await owner.InitCache(_init_cache())
        lost = owner.Execute()
        await _step(lost, _prefill())
        await _step(lost, _decode(1))
        lost.cancel()
        await _until_cache_released(successor)
        reply = await successor.InitCache(_init_cache())
        stream = successor.Execute()
        # The same sequence id, blocks and step ids again: nothing of the lost owner's state is left to clash.
        tokens = [await _step(stream, _prefill())] + [await _step(stream, _decode(s)) for s in (1, 2)]

        assert reply.num_gpu_blocks == NUM_BLOCKS
        assert tokens == GOLDEN["greedy_new_ids"][:3]
        stream.cancel()

    _serve(test)


def test_a_stream_its_owner_half_closes_drops_the_state_as_a_cancelled_one_does() -> None:
    """grpc.aio ends the requests of a cancelled call as it ends a half-closed one, so the worker cannot keep the
    state of a stream whose requests ran out without now and then keeping that of a control plane that is gone."""

    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        owner = Stub(first)
        await owner.InitCache(_init_cache())
        stream = owner.Execute()
        await _step(stream, _prefill())
        await stream.done_writing()
        assert await stream.read() == grpc.aio.EOF
        await _until_cache_released(Stub(second))
        refused = await _refusal(Stub(second).Execute())

        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.details() == "InitCache must run before Execute"

    _serve(test)


async def _leave_with_a_step_in_flight(call: ExecuteCall) -> None:
    await _step(call, _prefill())
    await call.write(_decode(1))  # its reply not read: the step is being launched or finished when the cancel lands
    call.cancel()


async def _leave_after_every_reply(call: ExecuteCall) -> None:
    await _step(call, _prefill())
    await _step(call, _decode(1))
    call.cancel()


# Each owner has had a reply, so its stream reached the worker (one cancelled before that may never have).
_WAYS_TO_LEAVE = (_leave_with_a_step_in_flight, _leave_after_every_reply)


def test_every_owner_that_leaves_makes_the_worker_drop_its_state_before_the_next_takes_over() -> None:
    """Each cancel races the worker's reading of the requests and writing of the replies; none may leave the
    lost owner's sequences and blocks behind (one in eight did, when the requests' end was taken for a close)."""

    async def test(first: grpc.aio.Channel, second: grpc.aio.Channel, worker: Worker) -> None:
        stub, successor = Stub(first), Stub(second)
        still_held = []
        for attempt in range(16):
            await stub.InitCache(_init_cache())
            await _WAYS_TO_LEAVE[attempt % len(_WAYS_TO_LEAVE)](stub.Execute())
            try:
                await _until_cache_released(successor)
            except TimeoutError:
                still_held.append(attempt)

        assert still_held == []

    _serve(test)


class _ReplyNeverSent:
    """The server side of a call whose first reply is still being written when the client cancels."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()

    async def write(self, message: pb.ExecuteResponse) -> None:
        self.writing.set()
        await asyncio.Event().wait()


async def _run_as_grpc_aio_does(handler: Awaitable[None] | AsyncIterator[pb.ExecuteResponse],
                                context: _ReplyNeverSent) -> None:
    """What grpc.aio's server runs in the call's task: a coroutine handler itself, or a loop that writes what an
    async generator handler yields (and so waits outside the generator while a reply is written)."""
    if isinstance(handler, Awaitable):
        await handler
        return
    async for reply in handler:
        await context.write(reply)


def test_a_cancel_that_lands_while_a_reply_is_being_written_drops_the_state() -> None:
    """grpc.aio cancels the task that runs the handler wherever it waits; the release must not depend on where."""

    async def requests() -> AsyncIterator[pb.ExecuteRequest]:
        yield _prefill()
        await asyncio.Event().wait()  # the control plane sends nothing more

    async def run() -> None:
        worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU))
        servicer = WorkerServicer(worker)
        context = _ReplyNeverSent()
        await servicer.InitCache(_init_cache(), cast(Context, context))
        handler = asyncio.create_task(_run_as_grpc_aio_does(servicer.Execute(requests(), cast(Context, context)),
                                                            context))
        await asyncio.wait_for(context.writing.wait(), timeout=10.0)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        servicer.close()  # runs what the step thread still has queued

        assert not worker.is_cache_initialized

    asyncio.run(run())
