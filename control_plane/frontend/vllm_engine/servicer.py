"""vLLM's engine protocol (vllm.grpc.engine.VllmEngine, stubs of smg-grpc-proto) on the public port, so that the
Shepherd Model Gateway fronts pagedserve: the only module of this package that imports grpc."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.message import Message
from smg_grpc_proto.generated import common_pb2 as smg
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm

from pagedserve.contract.codec import sampling_params_from_proto
from pagedserve.contract.sampling_params import SamplingParams, validate_prompt
from pagedserve.control_plane.errors import (
    InvalidArgumentError,
)
from pagedserve.control_plane.frontend.convert import (
    RequestLimits,
    check_n,
    check_prompt_size,
    check_request_id,
    prompt_from_proto,
)
from pagedserve.control_plane.frontend.engine_client import EngineClient, RequestAbortedError
from pagedserve.control_plane.frontend.status import Abort, decoded, status_of_errors, strict_decoder
from pagedserve.control_plane.frontend.vllm_engine.convert import (
    check_request_fields,
    max_tokens_for,
    prompt_request,
    sampling_params_from_vllm,
    truncated_prompt,
)
from pagedserve.control_plane.frontend.vllm_engine.info import LoadReporter, model_info, server_info
from pagedserve.control_plane.frontend.vllm_engine.kv_events import kv_event_batch_to_vllm
from pagedserve.control_plane.frontend.vllm_engine.model_files import build_tokenizer_bundle, read_config_facts
from pagedserve.control_plane.frontend.vllm_engine.outputs import VllmResponses
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.constraint_validator import ConstraintValidator
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2

log = structlog.get_logger()

SERVICE_NAME: str = vllm.DESCRIPTOR.services_by_name["VllmEngine"].full_name
TOKENIZER_THREADS = 2  # beside GenerationService's: texts here are bounded the same way before they are tokenized

# What this server does not do, with the reason each call of it gets (UNIMPLEMENTED).
_UNIMPLEMENTED = {
    "Embed": "embeddings are not supported: pagedserve serves generative models only",
    "FlushCache": "flushing the prefix cache is not supported: blocks leave it by LRU eviction only",
    "StartProfile": "profiling is not supported over this protocol",
    "StopProfile": "profiling is not supported over this protocol",
}


class VllmEngineServicer:
    """vLLM's engine protocol over the frontend's engine client: requests meet the public service's bounds and
    validation (frontend/convert.py, contract/), are admitted as GenerationService admits them, and their
    chunks leave as vLLM's messages. KV events and loads come from the engine process."""

    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model: ServedModel, model_dir: Path,
                 constraints: ConstraintValidator, max_num_seqs: int | None = None) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._model = model
        self._model_dir = model_dir
        self._constraints = constraints
        self._limits = RequestLimits(
            vocab_size=model.vocab_size, max_model_len=model.max_model_len,
            max_chars_per_token=tokenizer.max_chars_per_token, max_num_seqs=max_num_seqs,
        )
        self._max_num_seqs = max_num_seqs
        self._facts = read_config_facts(model_dir)
        self._bundle = build_tokenizer_bundle(model_dir)
        self._loads = LoadReporter(model, max_num_seqs)
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="vllm-tokenize")
        self._started_s = time.time()
        self._last_receive_s = 0.0

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: vllm.GenerateRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[vllm.GenerateResponse]:
        arrival_s = time.monotonic()
        try:
            with status_of_errors():
                request = decoded(request)
                self._last_receive_s = time.time()
                prompt_token_ids, sampling, params = await self._admissible(request)
                request_id = self._engine.add_request(
                    prompt_token_ids, sampling, request.request_id, arrival_time_s=arrival_s)
            responses = VllmResponses(prompt_token_ids, params, request.stream)
            with structlog.contextvars.bound_contextvars(request_id=request_id), status_of_errors():
                try:
                    async for chunk in self._engine.stream(request_id):
                        for message in responses.feed(chunk):
                            yield message
                except RequestAbortedError:
                    for message in responses.aborted():
                        yield message
        except Abort as abort:
            await abort.send(context)

    async def _admissible(
        self, request: vllm.GenerateRequest
    ) -> tuple[tuple[int, ...], common_pb2.SamplingParams, SamplingParams]:
        """The prompt's ids, our SamplingParams message and its checked domain value, validated as the public
        service validates (cheap bounds first, then tokenizing on a thread, then the model's limits)."""
        check_request_fields(request)
        ours = prompt_request(request)
        check_request_id(ours.request_id)
        truncates = request.sampling_params.HasField("truncate_prompt_tokens")
        if not truncates:
            check_prompt_size(ours, self._limits)
        sampling = sampling_params_from_vllm(request.sampling_params)
        loop = asyncio.get_running_loop()
        prompt_token_ids = await loop.run_in_executor(self._tokenize_pool, prompt_from_proto, ours, self._tokenizer)
        prompt_token_ids = truncated_prompt(prompt_token_ids, request.sampling_params, self._model.max_model_len)
        validate_prompt(prompt_token_ids, self._model.vocab_size, self._model.max_model_len)
        max_tokens_for(sampling, len(prompt_token_ids), self._model.max_model_len)
        params = sampling_params_from_proto(sampling)
        check_n(params, self._limits)
        params.validate(self._model.vocab_size, self._model.max_model_len, len(prompt_token_ids))
        if params.structured_output is not None:  # compiles (cached) before anything is allocated
            await loop.run_in_executor(self._tokenize_pool, self._constraints.check, params)
        return prompt_token_ids, sampling, params

    async def HealthCheck(  # noqa: N802
        self, request: vllm.HealthCheckRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> vllm.HealthCheckResponse:
        healthy = self._engine.is_serving
        return vllm.HealthCheckResponse(
            healthy=healthy, message="serving" if healthy else "not serving: no worker can take a request now",
        )

    async def Abort(  # noqa: N802
        self, request: vllm.AbortRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> vllm.AbortResponse:
        """Ends each open request of these ids (its stream closes with finish reason "abort"); ids of requests
        that are not open are skipped, as vLLM does."""
        try:
            with status_of_errors():
                request = decoded(request)
                aborted = [request_id for request_id in request.request_ids if self._engine.abort(request_id)]
                log.info("requests_aborted", num_requested=len(request.request_ids), num_aborted=len(aborted))
                return vllm.AbortResponse()
        except Abort as abort:
            await abort.send(context)

    async def GetModelInfo(  # noqa: N802
        self, request: vllm.GetModelInfoRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> vllm.GetModelInfoResponse:
        try:
            with status_of_errors():
                decoded(request)
                return model_info(self._model, self._model_dir, self._facts)
        except Abort as abort:
            await abort.send(context)

    async def GetServerInfo(  # noqa: N802
        self, request: vllm.GetServerInfoRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> vllm.GetServerInfoResponse:
        try:
            with status_of_errors():
                decoded(request)
                status = await self._engine.status()
                return server_info(self._model, status, self._max_num_seqs, self._started_s, self._last_receive_s)
        except Abort as abort:
            await abort.send(context)

    async def GetLoads(  # noqa: N802
        self, request: vllm.GetLoadsRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> vllm.GetLoadsResponse:
        """The core section (the only one this server has: others asked for are left out, as vLLM does)."""
        try:
            with status_of_errors():
                request = decoded(request)
                if request.HasField("dp_rank") and request.dp_rank != 0:
                    raise InvalidArgumentError("dp_rank", f"this server has one rank (0), got {request.dp_rank}")
                return self._loads.loads(await self._engine.status())
        except Abort as abort:
            await abort.send(context)

    async def GetTokenizer(  # noqa: N802
        self, request: smg.GetTokenizerRequest | InvalidArgumentError, context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[smg.GetTokenizerChunk]:
        """The model directory's tokenizer files and chat template, zipped; the last chunk carries the SHA-256."""
        try:
            with status_of_errors():
                decoded(request)
            chunks = self._bundle.chunks()
            for index, data in enumerate(chunks):
                yield smg.GetTokenizerChunk(data=data, sha256=self._bundle.sha256 if index == len(chunks) - 1 else "")
        except Abort as abort:
            await abort.send(context)

    async def SubscribeKvEvents(  # noqa: N802
        self, request: smg.SubscribeKvEventsRequest | InvalidArgumentError,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[smg.KvEventBatch]:
        """The prefix cache's event batches from start_sequence_number (0: the cache as it is, then its changes).
        OUT_OF_RANGE: those batches are no longer kept; DATA_LOSS: this subscriber fell behind them. Either way
        the subscriber starts over from 0. No load records travel here: GetLoads answers for them."""
        try:
            with status_of_errors():
                request = decoded(request)
                await context.send_initial_metadata(())  # the subscriber's call resolves before the first batch
                async for batch in self._engine.watch_kv_events(request.start_sequence_number):
                    yield kv_event_batch_to_vllm(batch, self._model.block_size)
        except Abort as abort:
            await abort.send(context)


async def _unimplemented(reason: str, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, reason)


def add_vllm_engine_service(servicer: VllmEngineServicer, server: grpc.aio.Server) -> str:
    """Registers VllmEngine on server with strict request decoders; what pagedserve does not do answers
    UNIMPLEMENTED with the reason. Returns the service's full name."""
    methods = vllm.DESCRIPTOR.services_by_name["VllmEngine"].methods_by_name
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, method in methods.items():
        request_type: Any = _message_class(method.input_type.full_name)
        response_type: Any = _message_class(method.output_type.full_name)
        decode, encode = strict_decoder(request_type), response_type.SerializeToString
        if name in _UNIMPLEMENTED:
            behaviour: Any = _unimplemented_handler(_UNIMPLEMENTED[name])
        else:
            behaviour = getattr(servicer, name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(behaviour, decode, encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    return SERVICE_NAME


def _unimplemented_handler(reason: str) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _unimplemented(reason, context)

    return handle


def _message_class(full_name: str) -> type[Message]:
    for module in (vllm, smg):
        package = module.DESCRIPTOR.package + "."
        if full_name.startswith(package):
            return getattr(module, full_name[len(package):])  # type: ignore[no-any-return]
    raise KeyError(full_name)
