"""The public GenerationService over gRPC: the only control-plane module that maps errors to status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.contract.codec import sampling_params_from_proto
from pagedserve.contract.sampling_params import validate_prompt
from pagedserve.control_plane.errors import (
    EngineUnavailableError,
    InvalidArgumentError,
    NotFoundError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.frontend.convert import prompt_from_proto
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.relay.convert import served_model_to_proto
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc

log = structlog.get_logger()

_STATUS_OF_ERROR: tuple[tuple[type[PagedServeError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (WorkerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _status_of_errors() -> Iterator[None]:
    """Turns a domain error into the status code STYLE.md §9 assigns it; anything else is INTERNAL."""
    try:
        yield
    except PagedServeError as exc:
        code = next((c for kind, c in _STATUS_OF_ERROR if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
        raise _Abort(code, str(exc)) from exc
    except Exception as exc:
        log.exception("internal_error")
        raise _Abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}") from exc


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    """Tokenizes and validates requests, hands them to the engine process and streams their chunks back."""

    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model: ServedModel) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._model = model

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            with _status_of_errors():
                prompt_token_ids = prompt_from_proto(request, self._tokenizer)
                validate_prompt(prompt_token_ids, self._model.vocab_size, self._model.max_model_len)
                params = sampling_params_from_proto(request.sampling_params)
                params.validate(self._model.vocab_size, self._model.max_model_len, len(prompt_token_ids))
                request_id = self._engine.add_request(
                    prompt_token_ids, request.sampling_params, request.request_id, request.priority,
                )
            with structlog.contextvars.bound_contextvars(request_id=request_id), _status_of_errors():
                async for response in self._engine.stream(request_id):
                    yield response
        except _Abort as abort:
            await context.abort(abort.code, str(abort))

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        add_special_tokens = request.add_special_tokens if request.HasField("add_special_tokens") else True
        token_ids = self._tokenizer.encode(request.text, add_special_tokens=add_special_tokens)
        return pb.TokenizeResponse(token_ids=token_ids, tokens=self._tokenizer.convert_ids_to_tokens(token_ids))

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return served_model_to_proto(self._model)

    async def GetServerStatus(  # noqa: N802
        self, request: pb.GetServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerStatusResponse:
        try:
            with _status_of_errors():
                return await self._engine.status()
        except _Abort as abort:
            await context.abort(abort.code, str(abort))


async def build_server(servicer: GenerationServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """An aio server with the generation service, grpc.health.v1 (SERVING) and reflection; returns its port."""
    server = grpc.aio.server()
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (
        pb.DESCRIPTOR.services_by_name["GenerationService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, server)
    for name in ("", service_names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(address)
    return server, port
