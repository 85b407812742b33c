"""The floor under a first token's gRPC hops: what grpc.aio itself costs, with client and server in one otherwise
idle process, and what a prompt's 1,024 ids cost to build and read as a repeated field and as packed bytes.

    python -m benchmarks.grpc_hops [--calls 300] [--messages 500]

A first token crosses six hops (client -> frontend -> engine -> worker and back): one new call and five messages on
open streams (benchmarks.first_token_path measures them in a running server). This is their floor on this host: a
new server-streaming call timed from the client's call to the handler's entry and on to the client's first message,
and a bidirectional stream's round trip of one message. Medians after a tenth of the calls as warm-up. Writes
<date>-grpc-hops-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import timeit
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from benchmarks import report
from pagedserve.contract.codec import token_ids_from_bytes, token_ids_to_bytes
from pagedserve.v1 import generation_service_pb2 as pb

PROMPT_IDS = 1024
HEADERS = ("measure", "p50 us")


def prompt_request(num_ids: int = PROMPT_IDS, vocab_size: int = 128_256, seed: int = 0) -> pb.GenerateRequest:
    ids = random.Random(seed).choices(range(vocab_size), k=num_ids)
    return pb.GenerateRequest(request_id="hop", token_ids=pb.TokenIds(ids=ids))


async def call_and_stream_us(calls: int, messages: int) -> dict[str, float]:
    """Medians (us) of a new call's way to its handler and back to its first message, and of a stream message's
    round trip, over a loopback server in this process."""
    entered: list[int] = []

    async def one_chunk(request: pb.GenerateRequest, context: object) -> AsyncIterator[pb.GenerateResponse]:
        entered.append(time.perf_counter_ns())
        yield pb.GenerateResponse()

    async def echo(requests: AsyncIterator[pb.GenerateRequest], context: object) -> AsyncIterator[pb.GenerateResponse]:
        async for _ in requests:
            yield pb.GenerateResponse()

    decode, encode = pb.GenerateRequest.FromString, pb.GenerateResponse.SerializeToString
    handlers = {"Call": grpc.unary_stream_rpc_method_handler(one_chunk, decode, encode),
                "Echo": grpc.stream_stream_rpc_method_handler(echo, decode, encode)}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hops.Hops", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request = prompt_request()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/hops.Hops/Call", request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateResponse.FromString)
            to_handler, round_trip = [], []
            for _ in range(calls):
                started = time.perf_counter_ns()
                async for _ in call(request):
                    returned = time.perf_counter_ns()
                to_handler.append(entered[-1] - started)
                round_trip.append(returned - started)
            stream = channel.stream_stream("/hops.Hops/Echo", request_serializer=pb.GenerateRequest.SerializeToString,
                                           response_deserializer=pb.GenerateResponse.FromString)()
            echoes = []
            for _ in range(messages):
                started = time.perf_counter_ns()
                await stream.write(request)
                await stream.read()
                echoes.append(time.perf_counter_ns() - started)
            await stream.done_writing()
    finally:
        await server.stop(None)
    warm = calls // 10
    return {"new call: client to handler": statistics.median(to_handler[warm:]) / 1e3,
            "new call: client to handler and back to the first message": statistics.median(round_trip[warm:]) / 1e3,
            "open stream: one message's round trip": statistics.median(echoes[messages // 10:]) / 1e3}


def prompt_ids_us(number: int = 2000) -> dict[str, float]:
    """Building and reading 1,024 ids (us), as a repeated int32 field of a message (the public TokenIds) and as the
    packed bytes the internal messages carry (contract.codec)."""
    ids = tuple(prompt_request().token_ids.ids)
    message = pb.TokenIds(ids=ids)
    packed = token_ids_to_bytes(ids)

    def us(statement: Any) -> float:
        return timeit.timeit(statement, number=number) / number * 1e6

    return {"1,024 ids into a repeated field": us(lambda: pb.TokenIds(ids=ids)),
            "1,024 ids out of a repeated field": us(lambda: tuple(message.ids)),
            "1,024 ids into packed bytes": us(lambda: token_ids_to_bytes(ids)),
            "1,024 ids out of packed bytes": us(lambda: token_ids_from_bytes(packed, "ids"))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--result-dir", type=Path, default=report.DEFAULT_RESULT_DIR)
    args = parser.parse_args(argv)
    medians = asyncio.run(call_and_stream_us(args.calls, args.messages)) | prompt_ids_us()
    metadata = report.run_metadata("grpc-hops", report.local_device())
    result = {"metadata": metadata, "calls": args.calls, "messages": args.messages, "p50_us": medians}
    rows = [[name, round(value, 1)] for name, value in medians.items()]
    paths = report.write_outputs(report.result_stem(args.result_dir, metadata), result, report.markdown_report(
        "The floor under a first token's gRPC hops", metadata, [("Medians", report.markdown_table(HEADERS, rows))]))
    print("wrote " + ", ".join(str(p) for p in paths))
    print(report.text_table(HEADERS, rows))
    return result


if __name__ == "__main__":
    main()
