"""A typed asyncio client for GenerationService: status codes become exceptions; retries with backoff."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from pagedserve.clients.chat_request import ChatMessageLike, ChatToolLike, chat_request
from pagedserve.clients.errors import RETRYABLE, PagedServeClientError, error_from_rpc
from pagedserve.contract.codec import sampling_params_to_proto
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.v1 import generation_service_pb2, generation_service_pb2_grpc

T = TypeVar("T")
_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry pushback trailer: milliseconds to wait, negative: do not retry
FinishReason = generation_service_pb2.FinishReason


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished completion of a request."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: int
    stop_reason: str


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS to the server (PEM bytes). root_certificates: the CAs to trust (None: the system's); certificate_chain
    and private_key: this client's own certificate, for a server that requires one (mTLS); server_name: the name
    the server's certificate must carry, when it is not the address's host."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None


def open_channel(address: str, tls: TlsOptions | None = None) -> grpc.aio.Channel:
    """An aio channel to address: over TLS when tls is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)
    options = [] if tls.server_name is None else [("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.aio.secure_channel(address, credentials, options=options)


class PagedServeClient:
    """Client of one pagedserve control plane. Use as `async with PagedServeClient(addr) as client:`.

    api_key: sent as `authorization: Bearer <api_key>` with every call (a server started with --api-key needs
    it). tls: connect over TLS (TlsOptions() trusts the system's CAs).

    Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried, with jittered exponential backoff, unless the server's
    `grpc-retry-pushback-ms` trailer says not to (a request that can never fit); a stream is retried only before
    its first chunk arrived (so no token is ever duplicated)."""

    def __init__(
        self, address: str = "127.0.0.1:50051", max_retries: int = 3, backoff_s: float = 0.2,
        api_key: str | None = None, tls: TlsOptions | None = None,
    ) -> None:
        self._channel = open_channel(address, tls)
        self._stub = generation_service_pb2_grpc.GenerationServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = () if api_key is None else (
            ("authorization", f"Bearer {api_key}"),
        )
        self._max_retries = max_retries
        self._backoff_s = backoff_s

    async def __aenter__(self) -> PagedServeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _retry_delay_s(self, rpc_error: grpc.aio.AioRpcError, attempt: int) -> float | None:
        """Seconds to wait before the next try, None for no more tries. Only UNAVAILABLE and RESOURCE_EXHAUSTED
        are retried, with jittered exponential backoff, and never when the server's `grpc-retry-pushback-ms`
        trailer is negative or not a number (gRPC's retry rule: the server says waiting will not help, as for a
        request that can never fit); a valid pushback replaces the backoff."""
        if not isinstance(error_from_rpc(rpc_error), RETRYABLE) or attempt == self._max_retries:
            return None
        pushback = [value for key, value in rpc_error.trailing_metadata() or () if key == _PUSHBACK]
        if not pushback:
            return self._backoff_s * (1 << attempt) * (0.5 + random.random())
        value = pushback[0]
        delay_ms = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else -1
        return None if delay_ms < 0 else delay_ms / 1e3

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self._max_retries + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as rpc_error:
                delay_s = self._retry_delay_s(rpc_error, attempt)
                if delay_s is None:
                    raise error_from_rpc(rpc_error) from None
            await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")

    async def generate_stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> AsyncIterator[generation_service_pb2.GenerateResponse]:
        """Streams the response chunks of one request as they arrive. params: SamplingParams, the same class the
        offline LLM takes (None: vLLM's defaults); its max_tokens must be a number, the protocol has no "up to the
        context length"."""
        if params is not None and params.max_tokens is None:
            raise ValueError("max_tokens: None (up to the context length) cannot be sent; give a number of tokens")
        request = generation_service_pb2.GenerateRequest(request_id=request_id, priority=priority)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        if params is not None:
            request.sampling_params.CopyFrom(sampling_params_to_proto(params))
        async for chunk in self._stream_with_retries(
            lambda: self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        ):
            yield chunk

    async def _stream_with_retries(
        self, start: Callable[[], grpc.aio.UnaryStreamCall[Any, T]]
    ) -> AsyncIterator[T]:
        """The stream's messages; a retryable failure before the first message starts the call again."""
        for attempt in range(self._max_retries + 1):
            call = start()
            received_any = False
            try:
                async for chunk in call:
                    received_any = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as rpc_error:
                delay_s = None if received_any else self._retry_delay_s(rpc_error, attempt)
                if delay_s is None:
                    raise error_from_rpc(rpc_error) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay_s)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, timeout_s: float | None = None
    ) -> list[Completion]:
        """Runs one request to the end; returns its completions ordered by index."""
        return await _completions(self.generate_stream(prompt, params, timeout_s=timeout_s))

    async def chat_stream(
        self,
        messages: Sequence[ChatMessageLike],
        params: SamplingParams | None = None,
        *,
        tools: Sequence[ChatToolLike] = (),
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        request_id: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> AsyncIterator[generation_service_pb2.GenerateResponse]:
        """Streams the chunks of one chat (messages as OpenAI's dicts or ChatMessage; tools likewise), rendered
        by the server's chat template. add_generation_prompt None: true unless continue_final_message."""
        request = chat_request(
            messages, params, tools=tools, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template_kwargs=chat_template_kwargs,
            request_id=request_id, priority=priority,
        )
        async for response in self._stream_with_retries(
            lambda: self._stub.Chat(request, timeout=timeout_s, metadata=self._metadata)
        ):
            yield response.chunk

    async def chat(
        self, messages: Sequence[ChatMessageLike], params: SamplingParams | None = None, **options: Any
    ) -> list[Completion]:
        """Runs one chat to the end (options as chat_stream's); returns its completions ordered by index."""
        return await _completions(self.chat_stream(messages, params, **options))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = generation_service_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = await self._with_retries(lambda: self._stub.Tokenize(request, metadata=self._metadata))
        return list(reply.token_ids)

    async def model_info(self) -> generation_service_pb2.GetModelInfoResponse:
        return await self._with_retries(
            lambda: self._stub.GetModelInfo(generation_service_pb2.GetModelInfoRequest(), metadata=self._metadata)
        )

    async def server_status(self) -> generation_service_pb2.GetServerStatusResponse:
        return await self._with_retries(
            lambda: self._stub.GetServerStatus(generation_service_pb2.GetServerStatusRequest(),
                                               metadata=self._metadata)
        )


async def _completions(chunks: AsyncIterator[generation_service_pb2.GenerateResponse]) -> list[Completion]:
    """A stream's chunks joined into its completions, ordered by index."""
    parts: dict[int, tuple[list[int], list[str], list[tuple[int, str]]]] = {}
    async for chunk in chunks:
        ids, texts, ends = parts.setdefault(chunk.index, ([], [], []))
        ids.extend(chunk.token_ids)
        texts.append(chunk.text)
        if chunk.finish_reason:
            ends.append((chunk.finish_reason, chunk.stop_reason))
    return [
        Completion(index, ids, "".join(texts), *(ends[0] if ends else (0, "")))
        for index, (ids, texts, ends) in sorted(parts.items())
    ]


__all__ = [
    "Completion", "FinishReason", "PagedServeClient", "PagedServeClientError", "SamplingParams", "TlsOptions",
    "open_channel",
]
