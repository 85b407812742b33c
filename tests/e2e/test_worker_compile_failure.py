"""Through the public API of real processes: a constraint the worker cannot compile (serve's --tokenizer has a special
token the worker's model directory lacks) ends that request with INVALID_ARGUMENT naming structured_output, while
the requests streaming beside it on the same worker get the tokens they get alone; every block comes back, health
stays SERVING, and the worker process is never restarted or cut off. So do constraints that leave a row no token to
sample, a failure that comes only once the request runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.clients.health_check import is_serving
from pagedserve.contract.codec import structured_output_to_proto
from pagedserve.v1 import common_pb2, generation_service_pb2_grpc
from pagedserve.v1 import generation_service_pb2 as pb
from tests.e2e.processes import Cluster, running_cluster
from tests.structured.mismatched_tokenizer import MARKED, MARKER, write_marked_tokenizer

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "One day, a little girl", "The cat"]
BESIDE = [
    common_pb2.SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True),
    common_pb2.SamplingParams(temperature=1.0, seed=11, max_tokens=96, ignore_eos=True),
    common_pb2.SamplingParams(temperature=1.0, seed=5, max_tokens=96,
                              structured_output=common_pb2.StructuredOutput(regex="[a-z ]{96,200}")),
]
FAILING = common_pb2.SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8,
                                    structured_output=structured_output_to_proto(MARKED))
# The regex needs letters or spaces; the only allowed id is end-of-sequence (2).
NO_TOKEN_LEFT = common_pb2.SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=[2],
                                          structured_output=common_pb2.StructuredOutput(regex="[a-z ]+"))
Stub = generation_service_pb2_grpc.GenerationServiceStub
Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


@pytest.fixture(scope="module")
def cluster(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tokenizer_dir = write_marked_tokenizer(stories_dir, tmp_path_factory.mktemp("marked"))
    logs = tmp_path_factory.mktemp("logs")
    with running_cluster(stories_dir, logs, serve_args=["--tokenizer", str(tokenizer_dir)]) as running:
        yield running


async def _tokens(call: Call, started: asyncio.Event | None = None) -> list[int]:
    tokens: list[int] = []
    async for response in call:
        tokens.extend(response.token_ids)
        if started is not None:
            started.set()
    return tokens


async def _alone_then_beside_a_failure(
    address: str, failing: common_pb2.SamplingParams,
) -> tuple[list[list[int]], list[list[int]], grpc.aio.AioRpcError]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)

        def generate(prompt: str, params: common_pb2.SamplingParams) -> Call:
            call: Call = stub.Generate(pb.GenerateRequest(text=prompt, sampling_params=params), timeout=120)
            return call

        alone = [await _tokens(generate(p, s)) for p, s in zip(PROMPTS, BESIDE, strict=True)]
        started = [asyncio.Event() for _ in PROMPTS]
        beside = [asyncio.create_task(_tokens(generate(p, s), e))
                  for p, s, e in zip(PROMPTS, BESIDE, started, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _tokens(generate("Once", failing))
        assert not any(task.done() for task in beside)  # the failure came while they streamed
        return alone, list(await asyncio.gather(*beside)), failed.value


def _events(log_path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]


def test_the_failing_request_ends_alone_and_the_streams_beside_it_go_on(cluster: Cluster) -> None:
    alone, beside, failure = asyncio.run(_alone_then_beside_a_failure(cluster.address, FAILING))
    with grpc.insecure_channel(cluster.address) as channel:
        status = Stub(channel).GetServerStatus(pb.GetServerStatusRequest(), timeout=10)

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failure.details() or ""
    assert details.startswith("structured_output.grammar: cannot be compiled: ")
    assert f'unknown special token: "{MARKER}"' in details
    assert beside == alone
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)
    assert is_serving(cluster.address, timeout_s=5.0)
    assert cluster.worker.poll() is None
    worker_events = _events(cluster.log_dir / "worker.log")
    control_events = _events(cluster.log_dir / "control_plane.log")
    assert worker_events.count("grammar_compile_failed") == 1
    assert control_events.count("request_failed_on_worker") == 1
    assert not {"lane_failed", "worker_failed", "cache_released"} & set(worker_events + control_events)
    assert worker_events.count("cache_initialized") == 1  # the worker was never reset by a new owner


def test_constraints_that_leave_no_token_end_that_request_alone(cluster: Cluster) -> None:
    alone, beside, failure = asyncio.run(_alone_then_beside_a_failure(cluster.address, NO_TOKEN_LEFT))
    with grpc.insecure_channel(cluster.address) as channel:
        status = Stub(channel).GetServerStatus(pb.GetServerStatusRequest(), timeout=10)

    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure.details() or "").startswith(
        "structured_output: no token satisfies structured_output and allowed_token_ids at once")
    assert beside == alone
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)
    assert is_serving(cluster.address, timeout_s=5.0)
    assert cluster.worker.poll() is None
