"""A run's requests sent at a rate and a concurrency: from this process's event loop, or split over several client
processes, each with its own loop and connection.

One grpc.aio process takes in at most about 32,000-36,500 streamed chunks a second on a 2-core host
(benchmarks.stream_capacity); a server streaming one token a chunk at high concurrency comes close to that, and a
client that falls behind turns requests over late and records chunk times late. Several processes share the work:
process j of k sends requests j, j + k, ... with its share of the concurrency and the rate (Poisson arrivals split
at random stay Poisson), all released together once every one is connected. Chunk times come from
time.perf_counter, the system-wide monotonic clock on Linux, so the processes' records mix.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from benchmarks.direct_client import Send
from benchmarks.random_dataset import BenchRequest
from benchmarks.serving_metrics import RequestRecord
from benchmarks.serving_paths import Endpoints, ServingPath, path_sender
from pagedserve.v1 import common_pb2

Constraint = common_pb2.StructuredOutput | None
START_TIMEOUT_S = 120.0  # for every client process to import, connect and reach the start
_Part = tuple[list[RequestRecord], float, float, float]  # records, first send, last reply, CPU seconds


@dataclass(frozen=True, slots=True)
class ClientRun:
    """What a run's clients saw: the records in request order, the wall time from the first send to the last reply,
    and the CPU seconds the client processes used meanwhile."""

    records: list[RequestRecord]
    duration_s: float
    cpu_s: float


async def run_requests(send: Send, requests: Sequence[BenchRequest], request_rate: float,
                       max_concurrency: int | None, seed: int, constraints: Sequence[Constraint] | None = None,
                       ) -> tuple[list[RequestRecord], float]:
    """Sends every request (Poisson arrivals at request_rate, at most max_concurrency in flight), request i with
    constraints[i] when given; returns the records in request order and the wall time from the first send to the
    last reply."""
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    arrivals = random.Random(seed)

    async def limited(request: BenchRequest, constraint: Constraint) -> RequestRecord:
        async with limit:
            return await send(request, constraint)

    start = time.perf_counter()
    tasks = []
    for request, constraint in zip(requests, constraints or [None] * len(requests), strict=True):
        tasks.append(asyncio.create_task(limited(request, constraint)))
        if math.isfinite(request_rate):
            await asyncio.sleep(arrivals.expovariate(request_rate))
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - start


@dataclass(frozen=True, slots=True)
class _Share:
    """One client process's part of a run."""

    path: ServingPath
    endpoints: Endpoints
    ignore_eos: bool
    requests: list[BenchRequest]
    constraints: list[Constraint]
    concurrency: int
    request_rate: float
    seed: int
    connections: int


def _run_share(share: _Share, start: Barrier) -> _Part:
    """In a client process: its records, its first send and last reply (perf_counter) and its CPU seconds."""
    async def main() -> _Part:
        async with path_sender(share.path, share.endpoints, share.ignore_eos, share.concurrency,
                               share.connections) as send:
            start.wait(START_TIMEOUT_S)  # nothing else runs on this loop yet
            cpu, began = time.process_time(), time.perf_counter()
            records, duration_s = await run_requests(send, share.requests, share.request_rate, share.concurrency,
                                                     share.seed, share.constraints)
            return records, began, began + duration_s, time.process_time() - cpu

    return asyncio.run(main())


def _serve_share(share: _Share, start: Barrier, results: Queue[tuple[int, _Part | BaseException]],
                 index: int) -> None:
    try:
        results.put((index, _run_share(share, start)))
    except BaseException as error:
        start.abort()  # the others stop waiting for this one
        results.put((index, RuntimeError(f"client process {index} failed: {error!r}")))
        raise


def shares_of(total: int, parts: int) -> list[int]:
    """total split into parts as even as integers allow, the larger first."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def run_in_processes(path: ServingPath, endpoints: Endpoints, ignore_eos: bool, requests: Sequence[BenchRequest],
                     request_rate: float, max_concurrency: int | None, seed: int,
                     constraints: Sequence[Constraint] | None, num_processes: int, connections: int = 1) -> ClientRun:
    """The run from min(num_processes, concurrency, requests) client processes (see the module's docstring), each
    with `connections` channels to the server."""
    concurrency = max_concurrency or len(requests)
    count = max(1, min(num_processes, concurrency, len(requests)))
    all_constraints = list(constraints or [None] * len(requests))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    results: Queue[tuple[int, _Part | BaseException]] = context.Queue()
    processes = []
    for index, share_concurrency in enumerate(shares_of(concurrency, count)):
        share = _Share(path, endpoints, ignore_eos, list(requests[index::count]), all_constraints[index::count],
                       share_concurrency, request_rate / count, seed + index, connections)
        processes.append(context.Process(target=_serve_share, args=(share, start, results, index), daemon=True))
    for process in processes:
        process.start()
    try:
        parts = _collect(results, processes)
    except BaseException:
        for process in processes:
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
    records = [parts[i % count][0][i // count] for i in range(len(requests))]  # request i went to process i % count
    began, ended = min(part[1] for part in parts), max(part[2] for part in parts)
    return ClientRun(records, ended - began, sum(part[3] for part in parts))


def _collect(results: Queue[tuple[int, _Part | BaseException]],
             processes: Sequence[multiprocessing.process.BaseProcess]) -> list[_Part]:
    """Every process's part, in process order; the first failure raised, a process that died without a word too."""
    outcomes: dict[int, _Part] = {}
    while len(outcomes) < len(processes):
        try:
            index, outcome = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for i, p in enumerate(processes) if i not in outcomes and p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client process exited with code {dead[0].exitcode} and no result") from None
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        outcomes[index] = outcome
    return [outcomes[index] for index in range(len(processes))]
