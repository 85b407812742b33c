"""max_model_len at start-up: above the model's limit is an error; a KV pool that cannot hold one sequence of it is
an error when asked for, and shrinks it (logged) when it came from the model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.control_plane.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedserve.control_plane.engine.model_len import MaxModelLenError, check_model_limit, fit_to_pools
from pagedserve.control_plane.engine.serving import start_engine
from pagedserve.control_plane.served_model import ServedModel

MORE_KV = "raise --gpu-memory-utilization (GPU workers), --kv-cache-memory or --num-gpu-blocks-override"


def test_a_max_model_len_above_the_models_limit_is_an_error_naming_both() -> None:
    with pytest.raises(MaxModelLenError) as raised:
        check_model_limit(4096, 2048)
    assert str(raised.value) == ("--max-model-len 4096 is more than the model's limit, max_position_embeddings 2048: "
                                 "pass --max-model-len 2048 or less, or leave it out")
    assert (check_model_limit(None, 2048), check_model_limit(2048, 2048), check_model_limit(100, 2048)) == (
        2048, 2048, 100)


def test_a_sequence_fits_a_pool_up_to_one_token_more_than_its_slots() -> None:
    # 10 blocks of 16 hold the KV of 160 tokens; the 161st is sampled and needs no slot.
    pools = [("w0", 12), ("w1", 10)]
    assert fit_to_pools(161, True, pools, 16) == 161
    with pytest.raises(MaxModelLenError) as raised:
        fit_to_pools(162, True, pools, 16)
    assert str(raised.value) == ("--max-model-len 162 needs 11 KV blocks of 16 tokens for one sequence, but worker "
                                 f"w1's pool has 10 (160 tokens): {MORE_KV}, or pass --max-model-len 160 or less")


def test_the_models_length_shrinks_to_the_smallest_pool_with_a_warning() -> None:
    with capture_logs() as logs:
        assert fit_to_pools(512, False, [("w0", 12), ("w1", 10)], 16) == 160
    [warning] = [entry for entry in logs if entry["event"] == "max_model_len_reduced"]
    assert (warning["log_level"], warning["max_model_len"], warning["model_max_model_len"], warning["worker_id"]) == (
        "warning", 160, 512, "w1")


class _FakeWorker:
    """A worker connection that reports a model and allocates a pool of num_blocks; it runs no step."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.cache_requests: list[CacheRequest] = []

    async def get_info(self) -> WorkerInfo:
        return WorkerInfo(worker_id="w0", model="stories260K", architecture="LlamaForCausalLM", dtype="float32",
                          device="cpu", vocab_size=512, max_position_embeddings=512)

    async def init_cache(self, request: CacheRequest) -> CacheInfo:
        self.cache_requests.append(request)
        return CacheInfo(num_gpu_blocks=self.num_blocks, num_cpu_blocks=0)

    async def send(self, plan: StepPlan) -> None:
        raise AssertionError("no step expected")

    async def receive(self) -> StepResult:
        raise AssertionError("no step expected")

    async def close(self) -> None:
        pass


def _start(stories260k_dir: Path, worker: _FakeWorker, max_model_len: int | None) -> ServedModel:
    async def body() -> ServedModel:
        engine, model, _ = await start_engine([worker], SchedulerConfig(max_model_len=max_model_len),
                                              CacheConfig(block_size=16), EngineConfig(), stories260k_dir, "stories")
        await engine.stop()
        return model

    return asyncio.run(body())


def test_start_up_serves_what_the_pool_holds_of_the_models_length(stories260k_dir: Path) -> None:
    assert _start(stories260k_dir, _FakeWorker(num_blocks=10), None).max_model_len == 160
    assert _start(stories260k_dir, _FakeWorker(num_blocks=64), None).max_model_len == 512


def test_start_up_refuses_a_length_the_model_cannot_take_before_any_cache_is_allocated(stories260k_dir: Path) -> None:
    worker = _FakeWorker(num_blocks=64)
    with pytest.raises(MaxModelLenError, match="--max-model-len 1024 is more than the model's limit"):
        _start(stories260k_dir, worker, 1024)
    assert worker.cache_requests == []


def test_start_up_refuses_a_requested_length_the_pool_cannot_hold(stories260k_dir: Path) -> None:
    with pytest.raises(MaxModelLenError, match="--max-model-len 300 needs 19 KV blocks of 16 tokens"):
        _start(stories260k_dir, _FakeWorker(num_blocks=10), 300)
