"""Two pagedserve servers behind one gateway with the cache-aware policy: requests that share a long prefix land on
one server (its prefix-cache hits rise, the other's do not); killing that server moves traffic to the other with
no failed request once the gateway has noticed (the test prints how long that took)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import openai
import pytest

from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc
from tests.e2e.gateway import running_gateway
from tests.e2e.processes import Cluster, running_cluster

pytestmark = pytest.mark.e2e

SHARED = " ".join(["Once upon a time, there was a little girl named Lily who loved to play in the park."] * 6)
HEALTH_CHECK_S = 1  # the gateway's probe interval here


@pytest.fixture(scope="module")
def servers(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Cluster]]:
    with ExitStack() as stack:
        yield [stack.enter_context(running_cluster(stories260k_dir, tmp_path_factory.mktemp(f"server{i}")))
               for i in range(2)]


def _status(cluster: Cluster) -> pb.GetServerStatusResponse:
    with grpc.insecure_channel(cluster.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        status: pb.GetServerStatusResponse = stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)
        return status


def test_shared_prefix_sticks_to_one_server_and_a_killed_server_loses_its_traffic(
    servers: list[Cluster], tmp_path: Path,
) -> None:
    extra = ["--policy", "cache_aware", "--health-check-interval-secs", str(HEALTH_CHECK_S),
             "--health-failure-threshold", "1", "--disable-retries"]
    with running_gateway([f"grpc://{s.address}" for s in servers], tmp_path / "smg.log", extra) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        client.completions.create(model=model, prompt=SHARED + " 0", max_tokens=2, temperature=0)
        before = [_status(s) for s in servers]
        for i in range(1, 9):
            client.completions.create(model=model, prompt=f"{SHARED} {i}", max_tokens=2, temperature=0)
        after = [_status(s) for s in servers]
        gains = [a.prefix_cache_hits - b.prefix_cache_hits for a, b in zip(after, before, strict=True)]
        served = [a.prompt_tokens - b.prompt_tokens for a, b in zip(after, before, strict=True)]
        sticky = max(range(2), key=lambda i: gains[i])
        assert gains[sticky] > 0 and gains[1 - sticky] == 0
        assert served[1 - sticky] == 0

        servers[sticky].control_plane.kill()
        killed_at = time.monotonic()
        last_failure = None
        successes_after = 0
        while successes_after < 10 and time.monotonic() - killed_at < 60:
            try:
                client.completions.create(model=model, prompt=f"{SHARED} after", max_tokens=2, temperature=0)
                successes_after += 1
            except openai.APIError:
                assert successes_after == 0, "a request failed after the gateway had moved the traffic"
                last_failure = time.monotonic() - killed_at
            time.sleep(0.1)
        assert successes_after == 10
        print(f"gateway noticed the killed server within {last_failure or 0.0:.2f} s")
