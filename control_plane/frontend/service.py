"""The public GenerationService over gRPC (its errors become status codes through frontend/status.py).

Every request is bounded before it costs anything: its bytes are decoded strictly (malformed messages and fields
this server does not know are INVALID_ARGUMENT), its sizes are checked (request id, prompt length, stop lists, n),
and only then is its text tokenized, on a thread of its own, never on the event loop that serves every stream.
Optional API keys and TLS guard the port; idle connections are closed (PUBLIC_SERVER_OPTIONS).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.contract.codec import sampling_params_from_proto
from pagedserve.contract.sampling_params import SamplingParams, truncated_prompt, validate_prompt
from pagedserve.control_plane.frontend.convert import (
    RequestLimits,
    check_chat_size,
    check_n,
    check_prompt_size,
    check_request_id,
    check_text_length,
    conversation_from_proto,
    prompt_from_proto,
)
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.status import Abort, decoded, status_of_errors, strict_decoder
from pagedserve.control_plane.relay.convert import served_model_to_proto
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.chat_template import ChatTemplate, Conversation
from pagedserve.control_plane.text.constraint_validator import ConstraintValidator
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.runtime.auth import refusal_handler
from pagedserve.runtime.reflection import add_reflection
from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc

log = structlog.get_logger()

_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
_OPEN_METHOD_PREFIX = "/grpc.health.v1.Health/"  # health probes need no API key; reflection does
_AUTHORIZATION = "authorization"
_BEARER = "Bearer "
# Threads that tokenize request texts. The tokenizer releases the interpreter lock, so they run beside the event
# loop; the texts they get are already bounded by length.
TOKENIZER_THREADS = 4
# The public server's gRPC options. A request message is at most 4 MiB (gRPC's default, stated here: larger ones end
# with RESOURCE_EXHAUSTED before they are read). Connections: a connection without a call for 5 minutes is closed
# (GOAWAY); while calls are open the server pings a silent client every 60 s and drops it when the ping is not
# answered within 20 s; a client may ping every 10 s at most, also without calls (more often: GOAWAY after 2 strikes).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
PUBLIC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)



_DESCRIBE_TIMEOUT_S = 5.0  # for the engine's answer to GetModelInfo


@dataclass(frozen=True, slots=True)
class PublicAccess:
    """Who may call the public port. api_keys: each call but health checks needs `authorization: Bearer <key>` of
    one of them (none: no key needed). TLS when tls_certificate_chain and tls_private_key (PEM) are given; with
    tls_client_ca, clients must also present a certificate it signed (mTLS). Reprs hide the secrets."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tls_certificate_chain: bytes | None = None
    tls_private_key: bytes | None = field(default=None, repr=False)
    tls_client_ca: bytes | None = None

    def __post_init__(self) -> None:
        if (self.tls_certificate_chain is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both a certificate chain and its private key")
        if self.tls_client_ca is not None and self.tls_certificate_chain is None:
            raise ValueError("a client CA (mTLS) needs the server's own certificate and key")
        for key in self.api_keys:
            if not key or not key.isascii() or not key.isprintable() or " " in key:
                raise ValueError("an API key must be non-empty printable ASCII without spaces")


class GenerationServicer(generation_service_pb2_grpc.GenerationServiceServicer):
    """Bounds, tokenizes and validates requests, hands them to the engine process and streams their chunks back.

    Requests arrive as build_server's strict decoders leave them: a message, or the InvalidArgumentError that says
    why its bytes were refused. Cheap checks run before tokenizing; tokenizing (and rendering a chat's template)
    runs on TOKENIZER_THREADS threads. A chat's rendered prompt then goes the way of a Generate prompt.
    """

    def __init__(
        self, engine: EngineClient, tokenizer: Tokenizer, model: ServedModel, max_num_seqs: int | None = None,
        chat_template: ChatTemplate | None = None, constraints: ConstraintValidator | None = None,
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._model = model
        self._chat_template = chat_template or ChatTemplate(tokenizer)
        self._limits = RequestLimits(
            vocab_size=model.vocab_size, max_model_len=model.max_model_len,
            max_chars_per_token=tokenizer.max_chars_per_token, max_num_seqs=max_num_seqs,
        )
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self._constraints = constraints or ConstraintValidator(tokenizer, model.vocab_size)

    async def _prompt_token_ids(self, request: pb.GenerateRequest) -> tuple[int, ...]:
        """The prompt's ids; a text is tokenized on the tokenizer threads."""
        if request.WhichOneof("prompt") != "text":
            return prompt_from_proto(request, self._tokenizer)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, prompt_from_proto, request, self._tokenizer)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival_s = time.monotonic()
        try:
            with status_of_errors():
                request = decoded(request)
                check_request_id(request.request_id)
                check_prompt_size(request, self._limits)
                params = sampling_params_from_proto(request.sampling_params)
                check_n(params, self._limits)
                prompt_token_ids = await self._prompt_token_ids(request)
                request_id = await self._admit(prompt_token_ids, params, request, arrival_s)
            with structlog.contextvars.bound_contextvars(request_id=request_id), status_of_errors():
                async for response in self._engine.stream(request_id):
                    yield response
        except Abort as abort:
            await abort.send(context)

    async def _admit(
        self, prompt_token_ids: tuple[int, ...], params: SamplingParams, request: pb.GenerateRequest | pb.ChatRequest,
        arrival_s: float,
    ) -> str:
        """Truncates the prompt as the params ask, checks its ids, the params and any output constraint against it
        (the constraint compiles on a tokenizer thread), then hands the request to the engine, which counts its
        latencies from arrival_s (when this process received it); its id."""
        prompt_token_ids = truncated_prompt(prompt_token_ids, params, self._model.max_model_len)
        validate_prompt(prompt_token_ids, self._model.vocab_size, self._model.max_model_len)
        params.validate(self._model.vocab_size, self._model.max_model_len, len(prompt_token_ids))
        if params.structured_output is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._tokenize_pool, self._constraints.check, params)
        return self._engine.add_request(
            prompt_token_ids, request.sampling_params, request.request_id, request.priority, arrival_s,
        )

    async def Chat(  # noqa: N802
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse]
    ) -> AsyncIterator[pb.ChatResponse]:
        arrival_s = time.monotonic()
        try:
            with status_of_errors():
                request = decoded(request)
                self._chat_template.check_available()
                check_request_id(request.request_id)
                check_chat_size(request, self._limits)
                params = sampling_params_from_proto(request.sampling_params)
                check_n(params, self._limits)
                conversation = conversation_from_proto(request)
                loop = asyncio.get_running_loop()
                prompt_token_ids = await loop.run_in_executor(self._tokenize_pool, self._chat_prompt, conversation)
                request_id = await self._admit(prompt_token_ids, params, request, arrival_s)
            with structlog.contextvars.bound_contextvars(request_id=request_id), status_of_errors():
                async for response in self._engine.stream(request_id):
                    yield pb.ChatResponse(chunk=response)
        except Abort as abort:
            await abort.send(context)

    def _chat_prompt(self, conversation: Conversation) -> tuple[int, ...]:
        """The conversation rendered and tokenized, on a tokenizer thread; the rendered text's length is bounded
        before it is tokenized, as a Generate prompt's is."""
        text = self._chat_template.render(conversation)
        check_text_length(text, "messages", self._limits)
        return tuple(self._tokenizer.encode(text, add_special_tokens=False))

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse]
    ) -> pb.TokenizeResponse:
        try:
            with status_of_errors():
                request = decoded(request)
                check_text_length(request.text, "text", self._limits)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._tokenize_pool, self._tokenize, request)
        except Abort as abort:
            await abort.send(context)

    def _tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        """Tokenize's reply, built on a tokenizer thread (a long text has many pieces to look up too)."""
        add_special_tokens = request.add_special_tokens if request.HasField("add_special_tokens") else True
        token_ids = self._tokenizer.encode(request.text, add_special_tokens=add_special_tokens)
        # encode() returns only ids of the vocabulary, and each of those has a piece: no None here.
        tokens = cast(list[str], self._tokenizer.convert_ids_to_tokens(token_ids))
        return pb.TokenizeResponse(token_ids=token_ids, tokens=tokens)

    async def GetModelInfo(  # noqa: N802
        self,
        request: pb.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        try:
            with status_of_errors():
                decoded(request)
                return served_model_to_proto(await self._engine.describe(_DESCRIBE_TIMEOUT_S))  # pools may change
        except Abort as abort:
            await abort.send(context)

    async def GetServerStatus(  # noqa: N802
        self,
        request: pb.GetServerStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetServerStatusRequest, pb.GetServerStatusResponse],
    ) -> pb.GetServerStatusResponse:
        try:
            with status_of_errors():
                decoded(request)
                return await self._engine.status()
        except Abort as abort:
            await abort.send(context)





def _add_generation_service(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """The generated add_GenerationServiceServicer_to_server, with strict request decoders."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, strict_decoder(pb.GenerateRequest), pb.GenerateResponse.SerializeToString),
        "Chat": grpc.unary_stream_rpc_method_handler(
            servicer.Chat, strict_decoder(pb.ChatRequest), pb.ChatResponse.SerializeToString),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, strict_decoder(pb.TokenizeRequest), pb.TokenizeResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, strict_decoder(pb.GetModelInfoRequest),
            pb.GetModelInfoResponse.SerializeToString),
        "GetServerStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerStatus, strict_decoder(pb.GetServerStatusRequest),
            pb.GetServerStatusResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(_SERVICE_NAME, handlers)


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call reach its method only with `authorization: Bearer <key>` of one of the keys (compared in
    constant time); health checks always pass. Reflection needs a key too: it is part of the API a key opens.
    A refused call ends with UNAUTHENTICATED before its request is even decoded."""

    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self._headers = tuple((_BEARER + key).encode("ascii") for key in api_keys)

    def _is_authorized(self, header: str | bytes) -> bool:
        received = header.encode("utf-8", "replace") if isinstance(header, str) else header
        return any([hmac.compare_digest(received, expected) for expected in self._headers])  # every key compared

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_METHOD_PREFIX):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        headers = [value for key, value in metadata if key == _AUTHORIZATION]
        if any(self._is_authorized(header) for header in headers):
            return handler
        reason = "invalid API key" if headers else "missing API key"
        return refusal_handler(handler, f"{reason}: send metadata '{_AUTHORIZATION}: Bearer <key>'")


# Registers one more service on a server; returns its full name (for reflection).
AddService = Callable[[grpc.aio.Server], str]


async def build_server(
    servicer: GenerationServicer, address: str, access: PublicAccess | None = None,
    more_services: tuple[AddService, ...] = (),
) -> tuple[grpc.aio.Server, int]:
    """An aio server with the generation service and more_services, grpc.health.v1 (SERVING) and reflection (v1 and
    v1alpha, with the .proto comments), under access's API keys and TLS (default: none) and PUBLIC_SERVER_OPTIONS;
    returns it and its port."""
    access = access or PublicAccess()
    interceptors = [_ApiKeyInterceptor(access.api_keys)] if access.api_keys else []
    server = grpc.aio.server(interceptors=interceptors, options=PUBLIC_SERVER_OPTIONS)
    _add_generation_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (
        pb.DESCRIPTOR.services_by_name["GenerationService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        *(add(server) for add in more_services),
    )
    add_reflection(server, service_names)
    for name in ("", service_names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if access.tls_certificate_chain is not None and access.tls_private_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(access.tls_private_key, access.tls_certificate_chain)],
            root_certificates=access.tls_client_ca, require_client_auth=access.tls_client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    return server, port
