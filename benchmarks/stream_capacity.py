"""How many streamed chunks a second the serving benchmark's direct client takes in, from a server that streams
without an engine behind it: a ceiling on what `benchmarks.serving` can measure on this host.

    python -m benchmarks.stream_capacity --concurrency 64,256 --num-requests 1024 --tokens 128

A child process serves GenerationService.Generate over grpc.aio, answering every request with `--tokens` chunks of
one token each as fast as grpc takes them; the benchmark's own Send (benchmarks/direct_client.py) consumes them at
each concurrency. Prints and records chunks per second and each side's CPU time over the wall time (1.0: one core
busy throughout), which says which side sets the rate. The server's side is the same per-chunk work as our frontend's
streaming to its clients, so its figure also bounds what one frontend process streams, roughly (Linux: reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from benchmarks.client_runs import run_requests
from benchmarks.direct_client import direct_sender
from benchmarks.random_dataset import BenchRequest
from pagedserve.runtime.port_check import free_loopback_port
from pagedserve.v1 import generation_service_pb2, generation_service_pb2_grpc

PROMPT = (1,) * 16
READY_TIMEOUT_S = 30.0


class StreamingService(generation_service_pb2_grpc.GenerationServiceServicer):
    """Answers every Generate with `tokens` one-token chunks, the last one finished."""

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens

    async def Generate(self, request: generation_service_pb2.GenerateRequest,  # noqa: N802 (gRPC's name)
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[
                           generation_service_pb2.GenerateResponse]:
        last = self._tokens - 1
        for index in range(self._tokens):
            yield generation_service_pb2.GenerateResponse(
                request_id=request.request_id, sequence_number=index, token_ids=[1000 + index], text=" token",
                finish_reason=(generation_service_pb2.FINISH_REASON_LENGTH if index == last
                               else generation_service_pb2.FINISH_REASON_UNSPECIFIED))


def serve_chunks(port: int, tokens: int) -> None:
    """In a child process: StreamingService on 127.0.0.1:port until killed."""
    async def main() -> None:
        server = grpc.aio.server()
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(StreamingService(tokens), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def wait_ready(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds the process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def consume(address: str, server_pid: int, concurrency: int, num_requests: int,
                  tokens: int) -> dict[str, float]:
    """Sends num_requests at the given concurrency; chunks received, seconds, chunks per second, each side's CPU
    share of one core, failed requests."""
    requests = [BenchRequest(prompt_token_ids=PROMPT, output_len=tokens)] * num_requests
    async with direct_sender(address, ignore_eos=True) as send:
        client_cpu, server_cpu = time.process_time(), process_cpu_s(server_pid)
        records, seconds = await run_requests(send, requests, math.inf, concurrency, seed=0)
        client_cpu, server_cpu = time.process_time() - client_cpu, process_cpu_s(server_pid) - server_cpu
    chunks = sum(len(record.chunk_times_s) for record in records)
    return {"concurrency": concurrency, "chunks": chunks, "seconds": seconds, "chunks_per_s": chunks / seconds,
            "client_cpu": client_cpu / seconds, "server_cpu": server_cpu / seconds,
            "failed": sum(1 for record in records if record.error)}


def measure(concurrency_levels: Sequence[int], num_requests: int, tokens: int) -> list[dict[str, float]]:
    port = free_loopback_port()
    server = multiprocessing.get_context("spawn").Process(target=serve_chunks, args=(port, tokens), daemon=True)
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        asyncio.run(wait_ready(address))
        pid = server.pid
        if pid is None:
            raise RuntimeError("the streaming server did not start")
        return [asyncio.run(consume(address, pid, level, num_requests, tokens)) for level in concurrency_levels]
    finally:
        server.kill()
        server.join()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="64,256", help="comma-separated concurrency levels")
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=128, help="chunks (one token each) per request")
    parser.add_argument("--device-label", default="cpu", help="where it ran, for the result's name")
    parser.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    return parser.parse_args(argv)


COLUMNS = ("concurrency", "chunks", "seconds", "chunks_per_s", "client_cpu", "server_cpu", "failed")


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    rows = measure(levels, args.num_requests, args.tokens)
    table = [[row[column] for column in COLUMNS] for row in rows]
    print(report.text_table(COLUMNS, table))
    metadata = report.run_metadata("stream_capacity", args.device_label)
    markdown = report.markdown_report("Streamed chunks the benchmark's client takes in", metadata,
                                      [("Results", report.markdown_table(COLUMNS, table))])
    stem = args.result_dir / f"{metadata['date'][:10]}-stream-capacity-{args.device_label}"
    for path in report.write_outputs(stem, {"metadata": metadata, "runs": rows}, markdown):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
