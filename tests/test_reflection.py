"""Reflection through real clients: grpc.reflection.v1 by `buf curl`, v1alpha by grpcio-reflection's own client
library; both serve the descriptors with the .proto files' comments."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pagedserve.runtime.reflection import V1, V1ALPHA, add_reflection
from pagedserve.v1 import generation_service_pb2 as pb
from pagedserve.v1 import generation_service_pb2_grpc

PROTO = Path(__file__).resolve().parents[1] / "protos" / "pagedserve" / "v1" / "generation_service.proto"
SERVICE = "pagedserve.v1.GenerationService"
BUF = ("npx", "--yes", "@bufbuild/buf@1.75.0")
T = TypeVar("T")


class _ModelInfo(generation_service_pb2_grpc.GenerationServiceServicer):
    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model="stories260K", max_model_len=512)


def _serve(body: Callable[[str], Awaitable[T]]) -> T:
    async def main() -> T:
        server = grpc.aio.server()
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(_ModelInfo(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        add_reflection(server, (SERVICE, health.SERVICE_NAME))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await body(f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=None)

    return asyncio.run(main())


async def _buf_curl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def _comment_in_source(field: str) -> str:
    """The comment above `string <field> = ...;` in generation_service.proto, as protoc records it."""
    match = re.search(rf"\n  //([^\n]*)\n  string {field} = ", PROTO.read_text())
    assert match is not None
    return match.group(1) + "\n"


def _leading_comment(file: descriptor_pb2.FileDescriptorProto, message: str, field: str) -> str:
    """The leading comment of message.field in the file's source info ('' when the file has none)."""
    message_index = [m.name for m in file.message_type].index(message)
    field_index = [f.name for f in file.message_type[message_index].field].index(field)
    path = [descriptor_pb2.FileDescriptorProto.MESSAGE_TYPE_FIELD_NUMBER, message_index,
            descriptor_pb2.DescriptorProto.FIELD_FIELD_NUMBER, field_index]
    return next((loc.leading_comments for loc in file.source_code_info.location if list(loc.path) == path), "")


def test_buf_curl_calls_the_api_with_the_schema_it_got_through_reflection_v1() -> None:
    reply = _serve(lambda address: _buf_curl(f"http://{address}/{SERVICE}/GetModelInfo"))
    assert json.loads(reply) == {"model": "stories260K", "maxModelLen": 512}


def test_grpcs_reflection_client_gets_the_proto_comments_over_v1alpha() -> None:
    def describe(address: str) -> tuple[list[str], descriptor_pb2.FileDescriptorProto, str]:
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = sorted(database.get_services())
            file = database.FindFileContainingSymbol(SERVICE)
            pool: Any = descriptor_pool.DescriptorPool(database)  # types-protobuf leaves its lookups unannotated
            method = pool.FindMethodByName(f"{SERVICE}.Generate")
            return services, file, method.input_type.full_name

    services, file, input_type = _serve(lambda address: asyncio.to_thread(describe, address))
    assert services == sorted([SERVICE, "grpc.health.v1.Health", V1, V1ALPHA])
    assert input_type == "pagedserve.v1.GenerateRequest"
    assert _leading_comment(file, "GenerateRequest", "request_id") == _comment_in_source("request_id")


async def _ask(channel: grpc.aio.Channel, service: str,
               requests: list[reflection_pb2.ServerReflectionRequest]) -> list[reflection_pb2.ServerReflectionResponse]:
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return [reply async for reply in call(iter(requests), timeout=10)]


def test_both_versions_answer_alike_and_an_unknown_symbol_is_not_found_without_ending_the_stream() -> None:
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="pagedserve.v1.Nope"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="pagedserve.v1.GenerateRequest.text"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1)]

    async def body(address: str) -> tuple[list[reflection_pb2.ServerReflectionResponse], ...]:
        async with grpc.aio.insecure_channel(address) as channel:
            return await _ask(channel, V1, requests), await _ask(channel, V1ALPHA, requests)

    v1, v1alpha = _serve(body)
    assert [r.WhichOneof("message_response") for r in v1] == [
        "error_response", "file_descriptor_response", "file_descriptor_response"]
    assert v1[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert [r.SerializeToString() for r in v1] == [r.SerializeToString() for r in v1alpha]
    names = [descriptor_pb2.FileDescriptorProto.FromString(data).name
             for data in v1[1].file_descriptor_response.file_descriptor_proto]
    assert names == ["pagedserve/v1/generation_service.proto", "pagedserve/v1/common.proto"]
    [v1_file] = [descriptor_pb2.FileDescriptorProto.FromString(data)
                 for data in v1[2].file_descriptor_response.file_descriptor_proto]
    assert (v1_file.package, [m.input_type for m in v1_file.service[0].method]) == (
        "grpc.reflection.v1", [".grpc.reflection.v1.ServerReflectionRequest"])
