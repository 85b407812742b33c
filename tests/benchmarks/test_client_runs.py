"""A run split over client processes: every request sent once, its record back in request order, the wall time
spanning every process's sends, and a process's failure raised rather than lost."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
from collections.abc import Iterator

import pytest

from benchmarks.client_runs import assign, run_in_processes, shares_of
from benchmarks.random_dataset import BenchRequest
from benchmarks.serving_paths import Endpoints, ServingPath
from benchmarks.stream_capacity import serve_chunks, wait_ready
from pagedserve.runtime.port_check import free_loopback_port

TOKENS = 6


@pytest.fixture(scope="module")
def streaming_server() -> Iterator[str]:
    """A server answering every Generate with TOKENS one-token chunks (no engine)."""
    port = free_loopback_port()
    process = multiprocessing.get_context("spawn").Process(target=serve_chunks, args=(port, TOKENS), daemon=True)
    process.start()
    address = f"127.0.0.1:{port}"
    asyncio.run(wait_ready(address))
    yield address
    process.kill()
    process.join()


def test_the_concurrency_is_shared_as_evenly_as_integers_allow() -> None:
    assert shares_of(256, 3) == [86, 85, 85]
    assert shares_of(4, 4) == [1, 1, 1, 1]
    assert sum(shares_of(1_000, 7)) == 1_000


def test_requests_go_to_processes_in_proportion_to_their_concurrency() -> None:
    assert assign(6, [2, 2, 2]) == [[0, 3], [1, 4], [2, 5]]
    assert assign(9, [2, 1]) == [[0, 1, 3, 4, 6, 7], [2, 5, 8]]  # twice the concurrency, twice the requests


def test_a_concurrency_that_does_not_divide_keeps_every_request_in_order(streaming_server: str) -> None:
    requests = [BenchRequest(prompt_token_ids=(1,) * (i + 1), output_len=TOKENS) for i in range(10)]
    run = run_in_processes(ServingPath.DIRECT, Endpoints(streaming_server), True, requests, math.inf, 3, 0, None, 2)
    assert run.processes == 2
    assert [record.prompt_len for record in run.records] == [i + 1 for i in range(10)]
    assert all(len(record.chunk_times_s) == TOKENS for record in run.records)


@pytest.mark.parametrize("connections", [1, 3])
def test_every_request_comes_back_in_request_order_from_several_processes(streaming_server: str,
                                                                          connections: int) -> None:
    requests = [BenchRequest(prompt_token_ids=(1,) * (i + 1), output_len=TOKENS) for i in range(9)]
    run = run_in_processes(ServingPath.DIRECT, Endpoints(streaming_server), True, requests, math.inf, 4, 0, None, 3,
                           connections)
    assert [record.prompt_len for record in run.records] == [i + 1 for i in range(9)]
    assert all(record.error is None and len(record.chunk_times_s) == TOKENS for record in run.records)
    first_send = min(record.start_s for record in run.records)
    last_chunk = max(record.chunk_times_s[-1] for record in run.records)
    assert run.duration_s >= last_chunk - first_send > 0
    assert run.cpu_s > 0


def test_a_client_process_that_fails_fails_the_run_with_its_reason() -> None:
    requests = [BenchRequest(prompt_token_ids=(1,), output_len=TOKENS) for _ in range(4)]
    with pytest.raises(RuntimeError, match="the gateway path needs a running gateway"):
        run_in_processes(ServingPath.GATEWAY, Endpoints("127.0.0.1:1"), True, requests, math.inf, 4, 0, None, 2)
