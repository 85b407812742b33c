"""WorkerService in-process on port 0: info, status codes, health and reflection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors import safe_open

from pagedserve.contract import codec
from pagedserve.contract.model_format import DeviceKind
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.service import start_server
from pagedserve.gpu_worker.worker import Worker
from pagedserve.v1 import worker_service_pb2 as pb
from pagedserve.v1 import worker_service_pb2_grpc
from tests.gpu_worker.harness import STORIES_DIR, greedy

BLOCK_SIZE = 4
NUM_BLOCKS = 16


def _serve(test: Callable[[grpc.aio.Channel, Worker], Awaitable[None]], enable_reflection: bool = False) -> None:
    """Runs test against a stories260K CPU worker served on a free loopback port."""

    async def run() -> None:
        worker = Worker.load(WorkerConfig(model_dir=STORIES_DIR, device=DeviceKind.CPU, worker_id="worker-7"))
        server = await start_server(worker, "127.0.0.1:0", enable_reflection=enable_reflection)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await test(channel, worker)
        finally:
            await server.stop(0)

    asyncio.run(run())


async def _stream(*requests: pb.ExecuteRequest) -> AsyncIterator[pb.ExecuteRequest]:
    for request in requests:
        yield request


async def _execute(
    stub: worker_service_pb2_grpc.WorkerServiceStub, *requests: pb.ExecuteRequest
) -> list[pb.ExecuteResponse]:
    return [response async for response in stub.Execute(_stream(*requests))]


def _init_cache() -> pb.InitCacheRequest:
    return pb.InitCacheRequest(block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS)


def _golden() -> dict[str, list[int]]:
    golden: dict[str, list[int]] = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
    return golden


def _prefill(prompt: list[int]) -> pb.ExecuteRequest:
    """Step 0: the whole prompt of sequence 1 in blocks 0, 1 (prompt of 5 tokens, block size 4)."""
    new = pb.NewSequence(seq_id=1, prompt_token_ids=codec.token_ids_to_bytes(prompt), sampling_params=greedy(),
                         block_ids=[0, 1], num_computed_tokens=0, num_scheduled_tokens=len(prompt))
    return pb.ExecuteRequest(step_id=0, new_sequences=[new])


def _decode(step_id: int, new_block_ids: list[int], start_index: int = 2) -> pb.ExecuteRequest:
    updates = [pb.BlockTableUpdate(start_index=start_index, block_ids=new_block_ids)] if new_block_ids else []
    scheduled = pb.ScheduledSequence(seq_id=1, num_scheduled_tokens=1, block_table_updates=updates)
    return pb.ExecuteRequest(step_id=step_id, scheduled_sequences=[scheduled])


def _stories_weight_bytes() -> int:
    with safe_open(str(STORIES_DIR / "model.safetensors"), framework="pt") as handle:
        return sum(handle.get_tensor(name).numel() * 4 for name in handle.keys())  # noqa: SIM118


def test_get_worker_info_describes_model_device_and_cache_state() -> None:
    config = json.loads((STORIES_DIR / "config.json").read_text())

    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        before = await stub.GetWorkerInfo(pb.GetWorkerInfoRequest())
        await stub.InitCache(_init_cache())
        after = await stub.GetWorkerInfo(pb.GetWorkerInfoRequest())

        kv_bytes = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * config["head_dim"] * 4
        assert (before.worker_id, before.model, before.architecture) == ("worker-7", "stories260K", "LlamaForCausalLM")
        assert (before.dtype, before.device, before.total_memory_bytes) == ("float32", "cpu", 0)
        assert before.vocab_size == config["vocab_size"]
        assert before.max_position_embeddings == config["max_position_embeddings"]
        assert (before.weight_bytes, before.kv_bytes_per_token) == (_stories_weight_bytes(), kv_bytes)
        assert (before.is_cache_initialized, after.is_cache_initialized) == (False, True)

    _serve(test)


def test_init_cache_returns_the_block_counts_allocated() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        bytes_per_block = worker.info().kv_bytes_per_token * BLOCK_SIZE
        reply = await stub.InitCache(pb.InitCacheRequest(
            block_size=BLOCK_SIZE, kv_cache_memory_bytes=10 * bytes_per_block + 1,
            swap_space_bytes=3 * bytes_per_block))

        assert (reply.num_gpu_blocks, reply.num_cpu_blocks, reply.peak_activation_bytes) == (10, 3, 0)

    _serve(test)


def test_execute_before_init_cache_is_failed_precondition() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        # The worker refuses the stream as it opens; a step written meanwhile could race that refusal in the
        # client's own send, so the call sends none and reads the status.
        call = stub.Execute()
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "InitCache must run before Execute" in (await call.details() or "")

    _serve(test)


def test_block_id_out_of_range_is_invalid_argument_and_leaves_state_unchanged() -> None:
    golden = _golden()

    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        await stub.InitCache(_init_cache())
        # One stream up to the rejection: a stream that ends otherwise drops the state (gpu_worker/service.py). The
        # step sent behind the rejected one, whose launch is queued before the rejection is known, is not launched.
        first: list[pb.ExecuteResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for reply in stub.Execute(_stream(_prefill(golden["prompt_ids"]), _decode(1, []), _decode(2, []),
                                                    _decode(3, [NUM_BLOCKS]), _decode(4, []))):
                first.append(reply)
        # The rejected step changed nothing: the same step with a valid block continues the sequence.
        second = await _execute(stub, _decode(3, [2]), _decode(4, []))

        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(NUM_BLOCKS) in (error.value.details() or "")
        tokens = [codec.step_result_from_proto(r).outputs[0].token_id for r in first + second]
        assert tokens == golden["greedy_new_ids"][:5]

    _serve(test)


def test_unknown_scheduled_sequence_is_invalid_argument() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        await stub.InitCache(_init_cache())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _execute(stub, _decode(0, []))

        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scheduled sequence 1" in (error.value.details() or "")

    _serve(test)


def test_out_of_range_sampling_params_are_invalid_argument() -> None:
    step = _prefill(_golden()["prompt_ids"])
    step.new_sequences[0].sampling_params.top_p = 1.5

    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        await stub.InitCache(_init_cache())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _execute(stub, step)

        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_p: must be in (0, 1], got 1.5" in (error.value.details() or "")
        assert worker.registry.states == {}

    _serve(test)


def test_init_cache_with_a_block_size_not_a_power_of_two_is_invalid_argument() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.InitCache(pb.InitCacheRequest(block_size=3, num_gpu_blocks_override=NUM_BLOCKS))

        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "block_size: must be a power of two, got 3" in (error.value.details() or "")
        assert not worker.is_cache_initialized

    _serve(test)


def test_execute_accepts_a_step_larger_than_grpc_default_4_mib() -> None:
    # 1.25M four-byte ids (5 MB); the out-of-range block makes the worker judge the step without running it.
    new = pb.NewSequence(seq_id=1, prompt_token_ids=codec.token_ids_to_bytes([500] * 1_250_000),
                         sampling_params=greedy(), block_ids=[NUM_BLOCKS], num_scheduled_tokens=1)
    step = pb.ExecuteRequest(step_id=0, new_sequences=[new])

    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        await stub.InitCache(_init_cache())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _execute(stub, step)

        assert step.ByteSize() > 4 * 2**20
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"block id {NUM_BLOCKS} out of range" in (error.value.details() or "")

    _serve(test)


def test_health_reports_serving_once_loaded() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        # types-grpcio-health-checking's HealthStub declares no Check.
        overall = await stub.Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]
        service = await stub.Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service="pagedserve.v1.WorkerService"))

        assert overall.status == service.status == health_pb2.HealthCheckResponse.SERVING

    _serve(test)


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    # types-grpcio-reflection's ServerReflectionStub takes no aio channel, and types ServerReflectionInfo as
    # binascii.Incomplete (an exception class) rather than a callable.
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [r async for r in stub.ServerReflectionInfo(ask())]  # type: ignore[operator]
    return {s.name for s in responses[0].list_services_response.service}


def test_reflection_lists_worker_service_when_enabled() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        assert {"pagedserve.v1.WorkerService", "grpc.health.v1.Health"} <= await _list_services(channel)

    _serve(test, enable_reflection=True)


def test_reflection_is_off_by_default() -> None:
    async def test(channel: grpc.aio.Channel, worker: Worker) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        call = stub.ServerReflectionInfo()  # type: ignore[operator]
        # Nothing is written: a server without the method ends the call at once, while a write racing that end could
        # read as the client's own INTERNAL. A server with reflection would hold the call open: the bound fails it.
        assert await asyncio.wait_for(call.code(), timeout=10) == grpc.StatusCode.UNIMPLEMENTED

    _serve(test)
