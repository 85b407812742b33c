"""One stories260K server (a worker and `pagedserve serve`) whose public port the VllmEngine tests call through
grpc.aio and smg-grpc-proto's stub, with a KV pool small enough that its prefix cache evicts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from pagedserve.v1 import generation_service_pb2_grpc
from tests.e2e.processes import Cluster, running_cluster

NUM_GPU_BLOCKS = 48  # of BLOCK_SIZE tokens: a few long prompts fill it
BLOCK_SIZE = 16
MAX_NUM_SEQS = 8
T = TypeVar("T")

Scenario = Callable[
    [vllm_engine_pb2_grpc.VllmEngineStub, generation_service_pb2_grpc.GenerationServiceStub],
    Coroutine[Any, Any, T],
]


@pytest.fixture(scope="package")
def server(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    serve_args = ["--num-gpu-blocks-override", str(NUM_GPU_BLOCKS), "--block-size", str(BLOCK_SIZE),
                  "--max-num-seqs", str(MAX_NUM_SEQS)]
    with running_cluster(stories260k_dir, tmp_path_factory.mktemp("vllm-engine-logs"), serve_args=serve_args) as c:
        yield c


def run_against(address: str, scenario: Scenario[T]) -> T:
    """Runs scenario(vllm_stub, generation_stub) on one grpc.aio channel to address."""

    async def main() -> T:
        async with grpc.aio.insecure_channel(address) as channel:
            return await scenario(vllm_engine_pb2_grpc.VllmEngineStub(channel),
                                  generation_service_pb2_grpc.GenerationServiceStub(channel))

    return asyncio.run(main())
