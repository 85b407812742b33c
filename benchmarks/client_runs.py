"""A run's requests sent at a rate and a concurrency: from this process's event loop, or split over several client
processes, each with its own loop and connection.

One grpc.aio process takes in at most about 32,000-36,500 streamed chunks a second on a 2-core host
(benchmarks.stream_capacity); a server streaming one token a chunk at high concurrency comes close to that, and a
client that falls behind turns requests over late and records chunk times late. Several processes share the work:
each gets a share of the concurrency, and of the requests and the rate in proportion to it (Poisson arrivals split
at random stay Poisson); all are released together by a barrier once every one has started (each channel connects
at its first request). Chunk times come from time.perf_counter, the system-wide monotonic clock on Linux, so the
processes' records mix.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import random
import threading
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
    the CPU seconds the client processes used meanwhile, and how many processes sent."""

    records: list[RequestRecord]
    duration_s: float
    cpu_s: float
    processes: int = 1


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


async def _timed_run(send: Send, requests: Sequence[BenchRequest], request_rate: float, max_concurrency: int | None,
                     seed: int, constraints: Sequence[Constraint] | None) -> _Part:
    """run_requests, with perf_counter times before its first send and after its last reply (both read here, so
    that they bracket every record's times) and this process's CPU seconds meanwhile."""
    cpu, began = time.process_time(), time.perf_counter()
    records, _ = await run_requests(send, requests, request_rate, max_concurrency, seed, constraints)
    return records, began, time.perf_counter(), time.process_time() - cpu


async def run_here(path: ServingPath, endpoints: Endpoints, ignore_eos: bool, requests: Sequence[BenchRequest],
                   request_rate: float, max_concurrency: int | None, seed: int,
                   constraints: Sequence[Constraint] | None, connections: int = 1) -> ClientRun:
    """The run from this process's event loop, over `connections` channels to the server."""
    async with path_sender(path, endpoints, ignore_eos, max_concurrency or len(requests), connections) as send:
        records, began, ended, cpu_s = await _timed_run(send, requests, request_rate, max_concurrency, seed,
                                                        constraints)
    return ClientRun(records, ended - began, cpu_s)


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
            return await _timed_run(send, share.requests, share.request_rate, share.concurrency, share.seed,
                                    share.constraints)

    return asyncio.run(main())


# A client process's report: its index, then its part, or why it failed and whether only because another one did.
_Report = tuple[int, _Part | None, str | None, bool]


def _serve_share(share: _Share, start: Barrier, results: Queue[_Report], index: int) -> None:
    try:
        results.put((index, _run_share(share, start), None, False))
    except BaseException as error:
        is_secondary = isinstance(error, threading.BrokenBarrierError)  # another process failed first
        results.put((index, None, f"client process {index} failed: {error!r}", is_secondary))
        start.abort()  # after the report: the others stop waiting for this one
        raise


def shares_of(total: int, parts: int) -> list[int]:
    """total split into parts as even as integers allow, the larger first."""
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def assign(num_requests: int, concurrencies: Sequence[int]) -> list[list[int]]:
    """The request indices of each process, in request order, in proportion to its concurrency: request i goes to
    the process whose share would stay the smallest (equal concurrencies: i % processes), so every process runs at
    its concurrency for about as long as the others."""
    assigned: list[list[int]] = [[] for _ in concurrencies]
    for request in range(num_requests):
        process = min(range(len(concurrencies)), key=lambda j: (len(assigned[j]) + 1) / concurrencies[j])
        assigned[process].append(request)
    return assigned


def run_in_processes(path: ServingPath, endpoints: Endpoints, ignore_eos: bool, requests: Sequence[BenchRequest],
                     request_rate: float, max_concurrency: int | None, seed: int,
                     constraints: Sequence[Constraint] | None, num_processes: int, connections: int = 1) -> ClientRun:
    """The run from min(num_processes, concurrency, requests) client processes (see the module's docstring), each
    with `connections` channels to the server."""
    concurrency = max_concurrency or len(requests)
    count = max(1, min(num_processes, concurrency, len(requests)))
    all_constraints = list(constraints or [None] * len(requests))
    concurrencies = shares_of(concurrency, count)
    assigned = assign(len(requests), concurrencies)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    results: Queue[_Report] = context.Queue()
    processes = []
    for index, (share_concurrency, indices) in enumerate(zip(concurrencies, assigned, strict=True)):
        share = _Share(path, endpoints, ignore_eos, [requests[i] for i in indices],
                       [all_constraints[i] for i in indices], share_concurrency,
                       request_rate * share_concurrency / concurrency, seed + index, connections)
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
    records: dict[int, RequestRecord] = {}
    for indices, part in zip(assigned, parts, strict=True):
        records.update(zip(indices, part[0], strict=True))
    began, ended = min(part[1] for part in parts), max(part[2] for part in parts)
    return ClientRun([records[i] for i in range(len(requests))], ended - began, sum(part[3] for part in parts), count)


def _collect(results: Queue[_Report], processes: Sequence[multiprocessing.process.BaseProcess]) -> list[_Part]:
    """Every process's part, in process order. Raises the first failure of a process's own, else the failure of
    one that stopped only because another did, else that a process died without a report."""
    parts: dict[int, _Part] = {}
    reported: set[int] = set()
    secondary: str | None = None
    while len(reported) < len(processes):
        try:
            index, part, error, is_secondary = results.get(timeout=1.0)
        except queue.Empty:
            silent = [i for i, p in enumerate(processes) if i not in reported and p.exitcode not in (None, 0)]
            if not silent:
                continue
            try:  # a report it sent before exiting is in the pipe by now
                index, part, error, is_secondary = results.get(timeout=1.0)
            except queue.Empty:
                raise RuntimeError(f"client process {silent[0]} exited with code {processes[silent[0]].exitcode} "
                                   "and no report") from None
        reported.add(index)
        if error is not None and not is_secondary:
            raise RuntimeError(error)
        if error is not None:
            secondary = secondary or error
        elif part is not None:
            parts[index] = part
    if secondary is not None:
        raise RuntimeError(secondary)
    return [parts[index] for index in range(len(processes))]
