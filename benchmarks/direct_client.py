"""The benchmark's direct path: our own GenerationService.Generate over grpc.aio, streamed, from prompt ids."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import grpc

from benchmarks.random_dataset import BenchRequest
from benchmarks.serving_metrics import RequestRecord
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc

# Sends one request (greedy, with an optional structured-output constraint) and records its stream.
Send = Callable[[BenchRequest, common_pb2.StructuredOutput | None], Awaitable[RequestRecord]]


async def _send(stub: generation_service_pb2_grpc.GenerationServiceStub, request: BenchRequest,
                ignore_eos: bool, constraint: common_pb2.StructuredOutput | None) -> RequestRecord:
    params = common_pb2.SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=ignore_eos,
                                       structured_output=constraint)
    message = generation_service_pb2.GenerateRequest(sampling_params=params)
    message.token_ids.ids.extend(request.prompt_token_ids)
    record = RequestRecord(prompt_len=len(request.prompt_token_ids), start_s=time.perf_counter())
    texts = []
    try:
        async for chunk in stub.Generate(message):
            if chunk.token_ids:
                record.chunk_times_s.append(time.perf_counter())
                record.chunk_num_tokens.append(len(chunk.token_ids))
                texts.append(chunk.text)
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    record.output_text = "".join(texts)
    return record


@asynccontextmanager
async def direct_sender(address: str, ignore_eos: bool, connections: int = 1) -> AsyncIterator[Send]:
    """A Send over `connections` channels to the server at address (requests take them in turn), open while the
    context is. More than one: each channel has a connection of its own (a local subchannel pool), so a server whose
    frontends share its port gets them spread over its frontends."""
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    async with AsyncExitStack() as stack:
        stubs = [generation_service_pb2_grpc.GenerationServiceStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(address, options=options)))
            for _ in range(connections)]
        turns = itertools.cycle(stubs)

        async def send(request: BenchRequest, constraint: common_pb2.StructuredOutput | None) -> RequestRecord:
            return await _send(next(turns), request, ignore_eos, constraint)

        yield send
