"""gRPC server reflection, grpc.reflection.v1 and v1alpha, serving the .proto files' descriptors with their comments.

grpcio-reflection answers only v1alpha (grpcurl and newer tools ask for v1 first), and from the generated stubs,
which carry no source info, so `grpcurl describe` would show the API without a word of its documentation. Here our
files come from the descriptor set `make protos` writes with --include_source_info (descriptors.binpb beside the
stubs); the others a server offers (health, reflection) from the generated descriptors. The two versions' messages
are the same on the wire (v1 is v1alpha with the package renamed), so one implementation, on v1alpha's message
classes, answers both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_METHOD = "ServerReflectionInfo"
_DESCRIPTOR_SET = "descriptors.binpb"  # in the package pagedserve.v1

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def _our_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The protocol's files, with source info, as `make protos` wrote them (dependencies first)."""
    data = resources.files("pagedserve.v1").joinpath(_DESCRIPTOR_SET).read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file under v1's name and package (the messages are equal)."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha: Any = reflection_pb2.DESCRIPTOR  # typed Any: types-protobuf leaves descriptors' methods unannotated
    v1alpha.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    return proto


class _Files:
    """FileDescriptorProtos by name, and a pool of them all that finds the file defining a symbol."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._generated: Any = reflection_pb2.DESCRIPTOR.pool  # the stubs' (the default pool): no source info
        for proto in _our_files():
            self.protos.setdefault(proto.name, proto)
        for name in service_names:
            if name != V1 and name not in {s for p in self.protos.values() for s in _service_names(p)}:
                self._add_generated(self._generated.FindFileContainingSymbol(name))
        v1 = _v1_reflection_file()
        self.protos[v1.name] = v1
        # Typed Any: types-protobuf leaves the pool's lookups unannotated.
        self.pool: Any = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        for name in self.protos:
            self._add_to_pool(name, added)

    def _add_generated(self, file: Any) -> None:
        for dependency in file.dependencies:
            self._add_generated(dependency)
        if file.name not in self.protos:
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            self.protos[file.name] = proto

    def _add_to_pool(self, name: str, added: set[str]) -> None:
        if name in added:
            return
        proto = self.protos[name]
        for dependency in proto.dependency:
            self._add_to_pool(dependency, added)
        self.pool.AddSerializedFile(proto.SerializeToString())
        added.add(name)

    def with_dependencies(self, name: str) -> list[bytes]:
        """The file and every file it needs, serialized, the file first."""
        ordered: list[str] = []
        pending = [name]
        while pending:
            current = pending.pop()
            if current not in ordered:
                ordered.append(current)
                pending.extend(self.protos[current].dependency)
        return [self.protos[n].SerializeToString() for n in ordered]


def _service_names(proto: descriptor_pb2.FileDescriptorProto) -> list[str]:
    return [f"{proto.package}.{service.name}" for service in proto.service]


class ReflectionServicer:
    """Answers ServerReflectionInfo of either version: list_services names the services given (and both
    reflection services); file requests return the file and its dependencies; unknown names are NOT_FOUND in the
    reply, as the protocol has it (the stream goes on)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._service_names = sorted({*service_names, V1, V1ALPHA})
        self._files = _Files(self._service_names)

    async def ServerReflectionInfo(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext[Request, Response],
    ) -> AsyncIterator[Response]:
        async for request in request_iterator:
            yield self.answer(request)

    def answer(self, request: Request) -> Response:
        """The reply to one request of the stream."""
        which = request.WhichOneof("message_request")
        try:
            if which == "list_services":
                services = [reflection_pb2.ServiceResponse(name=name) for name in self._service_names]
                return Response(original_request=request,
                                list_services_response=reflection_pb2.ListServiceResponse(service=services))
            if which == "all_extension_numbers_of_type":
                message = self._files.pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._files.pool.FindAllExtensions(message))
                return Response(original_request=request, all_extension_numbers_response=(
                    reflection_pb2.ExtensionNumberResponse(base_type_name=message.full_name,
                                                           extension_number=numbers)))
            return self._file_response(request, self._file_name(request, which))
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, f"not found: {which}")
        except ValueError as error:
            return _error(request, grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def _file_name(self, request: Request, which: str | None) -> str:
        pool = self._files.pool
        if which == "file_by_filename":
            if request.file_by_filename not in self._files.protos:
                raise KeyError(request.file_by_filename)
            return request.file_by_filename
        if which == "file_containing_symbol":
            return str(pool.FindFileContainingSymbol(request.file_containing_symbol).name)
        if which == "file_containing_extension":
            extension = request.file_containing_extension
            message = pool.FindMessageTypeByName(extension.containing_type)
            return str(pool.FindExtensionByNumber(message, extension.extension_number).file.name)
        raise ValueError(f"unknown request {which or '(none set)'}")

    def _file_response(self, request: Request, name: str) -> Response:
        files = reflection_pb2.FileDescriptorResponse(file_descriptor_proto=self._files.with_dependencies(name))
        return Response(original_request=request, file_descriptor_response=files)


def _error(request: Request, code: grpc.StatusCode, message: str) -> Response:
    return Response(original_request=request, error_response=reflection_pb2.ErrorResponse(
        error_code=code.value[0], error_message=message))


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves reflection, v1 and v1alpha, on server for these services (the reflection services are added)."""
    servicer = ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=Request.FromString,
        response_serializer=Response.SerializeToString)
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, {_METHOD: handler}) for name in (V1, V1ALPHA)))
