"""The public server's guards, in-process on a loopback port over a fake engine: API keys (health exempt), TLS and
mTLS, strict decoding of the request bytes, and the bounds checked before anything reaches the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from pagedserve.clients.client import PagedServeClient, TlsOptions
from pagedserve.clients.errors import Unauthenticated
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import (
    PUBLIC_SERVER_OPTIONS,
    GenerationServicer,
    PublicAccess,
    build_server,
)
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.tls_files import TlsFiles, has_openssl, make_tls_files

pb = generation_service_pb2
T = TypeVar("T")
KEYS = ("key-one", "key-two")
_MODEL = ServedModel(name="stories260K", architecture="LlamaForCausalLM", dtype="float32", vocab_size=512,
                     max_model_len=512, block_size=16, num_gpu_blocks=64, num_workers=1, eos_token_ids=(2,))


class _FakeEngine:
    """The engine process as the servicer sees it: records what is added, answers each request with one token."""

    def __init__(self) -> None:
        self.added: list[tuple[int, ...]] = []
        self.arrivals: list[tuple[float | None, float]] = []  # (the frontend's arrival time, when added)

    def add_request(self, prompt_token_ids: Sequence[int], sampling_params: common_pb2.SamplingParams,
                    request_id: str = "", priority: int = 0, arrival_time_s: float | None = None) -> str:
        self.added.append(tuple(prompt_token_ids))
        self.arrivals.append((arrival_time_s, time.monotonic()))
        return request_id or f"req-{len(self.added)}"

    async def stream(self, request_id: str) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(request_id=request_id, token_ids=[5], text=" x",
                                  finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=1, completion_tokens=1))

    async def status(self) -> pb.GetServerStatusResponse:
        return pb.GetServerStatusResponse(num_total_blocks=64)

    async def describe(self, timeout_s: float) -> ServedModel:
        return _MODEL


@pytest.fixture(scope="module")
def tokenizer(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not has_openssl():
        pytest.skip("no openssl command to make certificates with")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@asynccontextmanager
async def _serving(tokenizer: Tokenizer, engine: _FakeEngine, access: PublicAccess | None = None,
                   max_num_seqs: int | None = None) -> AsyncIterator[str]:
    servicer = GenerationServicer(cast(EngineClient, engine), tokenizer, _MODEL, max_num_seqs)
    server, port = await build_server(servicer, "127.0.0.1:0", access)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def _run(tokenizer: Tokenizer, body: Callable[[str, _FakeEngine], Awaitable[T]],
         access: PublicAccess | None = None, max_num_seqs: int | None = None) -> tuple[T, _FakeEngine]:
    engine = _FakeEngine()

    async def main() -> T:
        async with _serving(tokenizer, engine, access, max_num_seqs) as address:
            return await body(address, engine)

    return asyncio.run(main()), engine


async def _generate_code(address: str, metadata: Sequence[tuple[str, str]] = ()) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = generation_service_pb2_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(text="Once upon a time"), metadata=tuple(metadata), timeout=10)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


def test_the_engine_is_told_when_the_frontend_received_the_request(tokenizer: Tokenizer) -> None:
    async def body(address: str, _: _FakeEngine) -> tuple[float, tuple[grpc.StatusCode, str]]:
        return time.monotonic(), await _generate_code(address)

    (sent, result), engine = _run(tokenizer, body)
    assert result == (grpc.StatusCode.OK, "")
    [(arrival, added)] = engine.arrivals
    assert arrival is not None and sent <= arrival <= added  # received after the send, before the engine had it


# --- API keys -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("metadata", "expected"), [
    ((), (grpc.StatusCode.UNAUTHENTICATED, "missing API key: send metadata 'authorization: Bearer <key>'")),
    ((("authorization", "Bearer nope"),),
     (grpc.StatusCode.UNAUTHENTICATED, "invalid API key: send metadata 'authorization: Bearer <key>'")),
    ((("authorization", "key-one"),),
     (grpc.StatusCode.UNAUTHENTICATED, "invalid API key: send metadata 'authorization: Bearer <key>'")),
    ((("authorization", "Bearer key-one"),), (grpc.StatusCode.OK, "")),
    ((("authorization", "Bearer key-two"),), (grpc.StatusCode.OK, "")),
], ids=["missing", "wrong", "no-scheme", "first-key", "second-key"])
def test_generate_needs_one_of_the_api_keys(tokenizer: Tokenizer, metadata, expected) -> None:
    result, engine = _run(tokenizer, lambda address, _: _generate_code(address, metadata),
                          PublicAccess(api_keys=KEYS))
    assert result == expected
    assert len(engine.added) == (1 if expected[0] == grpc.StatusCode.OK else 0)  # a refused call adds nothing


async def _list_services(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]) -> grpc.StatusCode | int:
    """The number of services reflection lists, or the status code that refused the call."""
    call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    try:
        replies = [reply async for reply in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 metadata=tuple(metadata), timeout=10)]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return len(replies[0].list_services_response.service)


def test_health_needs_no_api_key_and_reflection_does(tokenizer: Tokenizer) -> None:
    async def body(address: str, _: _FakeEngine) -> tuple[int, grpc.StatusCode | int, grpc.StatusCode | int]:
        async with grpc.aio.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=10)
            refused = await _list_services(channel, ())
            allowed = await _list_services(channel, (("authorization", "Bearer key-two"),))
            return int(health.status), refused, allowed

    assert _run(tokenizer, body, PublicAccess(api_keys=KEYS))[0] == (
        health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.UNAUTHENTICATED, 4)


def test_the_client_sends_its_api_key_with_every_call(tokenizer: Tokenizer) -> None:
    async def body(address: str, _: _FakeEngine) -> tuple[str, int, int, int]:
        async with PagedServeClient(address, api_key="key-one") as client:
            completions = await client.generate("Once upon a time")
            info = await client.model_info()
            ids = await client.tokenize("Once")
            status = await client.server_status()
        return completions[0].text, info.vocab_size, len(ids), status.num_total_blocks

    assert _run(tokenizer, body, PublicAccess(api_keys=KEYS))[0] == (" x", 512, 2, 64)


def test_the_client_raises_unauthenticated_without_a_key(tokenizer: Tokenizer) -> None:
    async def body(address: str, _: _FakeEngine) -> str:
        async with PagedServeClient(address) as client:
            with pytest.raises(Unauthenticated) as info:
                await client.generate("Once upon a time")
        return info.value.message

    assert _run(tokenizer, body, PublicAccess(api_keys=KEYS))[0].startswith("missing API key")


def test_api_keys_must_be_header_safe() -> None:
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        PublicAccess(api_keys=("two words",))


# --- TLS ----------------------------------------------------------------------------------------------------------


def _tls_access(files: TlsFiles, mutual: bool) -> PublicAccess:
    return PublicAccess(tls_certificate_chain=files.server_cert.read_bytes(),
                        tls_private_key=files.server_key.read_bytes(),
                        tls_client_ca=files.ca_cert.read_bytes() if mutual else None)


async def _model_over(address: str, tls: TlsOptions | None) -> str:
    async with PagedServeClient(address, max_retries=0, tls=tls) as client:
        try:
            return (await client.model_info()).model
        except Exception as error:  # noqa: BLE001 (the test compares what each kind of client gets)
            return type(error).__name__


def test_tls_serves_clients_that_trust_its_ca_and_refuses_plaintext(tokenizer: Tokenizer, tls_files: TlsFiles) -> None:
    async def body(address: str, _: _FakeEngine) -> tuple[str, str]:
        trusted = await _model_over(address, TlsOptions(root_certificates=tls_files.ca_cert.read_bytes()))
        return trusted, await _model_over(address, None)

    assert _run(tokenizer, body, _tls_access(tls_files, mutual=False))[0] == ("stories260K", "Unavailable")


def test_mtls_refuses_clients_without_a_certificate_the_ca_signed(tokenizer: Tokenizer, tls_files: TlsFiles) -> None:
    roots = tls_files.ca_cert.read_bytes()

    async def body(address: str, _: _FakeEngine) -> tuple[str, str]:
        anonymous = await _model_over(address, TlsOptions(root_certificates=roots))
        with_certificate = await _model_over(address, TlsOptions(
            root_certificates=roots, certificate_chain=tls_files.client_cert.read_bytes(),
            private_key=tls_files.client_key.read_bytes()))
        return anonymous, with_certificate

    assert _run(tokenizer, body, _tls_access(tls_files, mutual=True))[0] == ("Unavailable", "stories260K")


def test_tls_needs_both_the_certificate_and_its_key() -> None:
    with pytest.raises(ValueError, match="both a certificate chain and its private key"):
        PublicAccess(tls_certificate_chain=b"cert")


# --- bounds and decoding, before the engine -----------------------------------------------------------------------


async def _raw_generate(address: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream("/pagedserve.v1.GenerationService/Generate", request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateResponse.FromString)
        try:
            async for _ in call(data, timeout=10):
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("data", "expected"), [
    (b"\xff\xff\xff", "malformed GenerateRequest: truncated field tag at byte 0"),
    (b"\x12\x02\xff\xfe", "malformed GenerateRequest: field text (2) is not valid UTF-8 (byte 0 of the string)"),
    (pb.GenerateRequest(text="Hi").SerializeToString() + b"\x30\x01",
     "unsupported GenerateRequest: unknown field number 6 in GenerateRequest (pagedserve.v1.GenerateRequest), not "
     "supported by this server"),
], ids=["garbage", "invalid-utf8", "unknown-field"])
def test_undecodable_bytes_are_invalid_argument_and_reach_no_engine(tokenizer: Tokenizer, data: bytes,
                                                                     expected: str) -> None:
    result, engine = _run(tokenizer, lambda address, _: _raw_generate(address, data))
    assert result == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    assert engine.added == []


def test_n_beyond_max_num_seqs_reaches_no_engine(tokenizer: Tokenizer) -> None:
    request = pb.GenerateRequest(text="Hi", sampling_params=common_pb2.SamplingParams(n=9))
    result, engine = _run(tokenizer, lambda address, _: _raw_generate(address, request.SerializeToString()),
                          max_num_seqs=8)
    assert result == (grpc.StatusCode.INVALID_ARGUMENT, "n: must be at most max_num_seqs=8 of this server, got 9")
    assert engine.added == []


@pytest.mark.parametrize(("constraint", "expected"), [
    (common_pb2.StructuredOutput(regex="[a-z"), "structured_output.regex: cannot be compiled: "),
    (common_pb2.StructuredOutput(json_schema='{"type": "objekt"}'), "structured_output.json_schema: cannot be "),
    (common_pb2.StructuredOutput(), "structured_output: must set one constraint"),
], ids=["regex", "json-schema", "empty"])
def test_a_constraint_that_does_not_compile_is_invalid_argument_and_reaches_no_engine(
    tokenizer: Tokenizer, constraint: common_pb2.StructuredOutput, expected: str
) -> None:
    request = pb.GenerateRequest(text="Hi", sampling_params=common_pb2.SamplingParams(structured_output=constraint))
    result, engine = _run(tokenizer, lambda address, _: _raw_generate(address, request.SerializeToString()))
    assert result[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert result[1].startswith(expected)
    assert engine.added == []


def test_tokenize_rejects_text_that_no_context_could_hold(tokenizer: Tokenizer) -> None:
    async def body(address: str, _: _FakeEngine) -> Any:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Tokenize(pb.TokenizeRequest(text="y" * 3585), timeout=10)
            ok = await stub.Tokenize(pb.TokenizeRequest(text="y" * 3584), timeout=10)
            return info.value.code(), info.value.details(), len(ok.token_ids) > 0

    code, details, has_ids = _run(tokenizer, body)[0]
    assert (code, has_ids) == (grpc.StatusCode.INVALID_ARGUMENT, True)
    assert details.startswith("text: text of 3585 characters cannot fit the maximum model length of 512 tokens")


def test_public_server_bounds_idle_connections() -> None:
    options = dict(PUBLIC_SERVER_OPTIONS)
    assert (options["grpc.max_connection_idle_ms"], options["grpc.keepalive_time_ms"],
            options["grpc.keepalive_timeout_ms"], options["grpc.max_receive_message_length"]) == (
        300_000, 60_000, 20_000, 4 * 1024 * 1024)
