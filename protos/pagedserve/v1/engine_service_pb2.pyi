from pagedserve.v1 import common_pb2 as _common_pb2
from pagedserve.v1 import generation_service_pb2 as _generation_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_ERROR_KIND_UNSPECIFIED: _ClassVar[RequestErrorKind]
    REQUEST_ERROR_KIND_INVALID_ARGUMENT: _ClassVar[RequestErrorKind]
    REQUEST_ERROR_KIND_RESOURCE_EXHAUSTED: _ClassVar[RequestErrorKind]
    REQUEST_ERROR_KIND_WORKER_UNAVAILABLE: _ClassVar[RequestErrorKind]
    REQUEST_ERROR_KIND_INTERNAL: _ClassVar[RequestErrorKind]
    REQUEST_ERROR_KIND_NEVER_FITS: _ClassVar[RequestErrorKind]
REQUEST_ERROR_KIND_UNSPECIFIED: RequestErrorKind
REQUEST_ERROR_KIND_INVALID_ARGUMENT: RequestErrorKind
REQUEST_ERROR_KIND_RESOURCE_EXHAUSTED: RequestErrorKind
REQUEST_ERROR_KIND_WORKER_UNAVAILABLE: RequestErrorKind
REQUEST_ERROR_KIND_INTERNAL: RequestErrorKind
REQUEST_ERROR_KIND_NEVER_FITS: RequestErrorKind

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _generation_service_pb2.GetModelInfoResponse
    def __init__(self, model: _Optional[_Union[_generation_service_pb2.GetModelInfoResponse, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status", "is_serving")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    IS_SERVING_FIELD_NUMBER: _ClassVar[int]
    status: _generation_service_pb2.GetServerStatusResponse
    is_serving: bool
    def __init__(self, status: _Optional[_Union[_generation_service_pb2.GetServerStatusResponse, _Mapping]] = ..., is_serving: _Optional[bool] = ...) -> None: ...

class WatchHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchHealthResponse(_message.Message):
    __slots__ = ("is_serving",)
    IS_SERVING_FIELD_NUMBER: _ClassVar[int]
    is_serving: bool
    def __init__(self, is_serving: _Optional[bool] = ...) -> None: ...

class AddCommand(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ...) -> None: ...

class RelayCommand(_message.Message):
    __slots__ = ("add", "abort_request_id")
    ADD_FIELD_NUMBER: _ClassVar[int]
    ABORT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    add: AddCommand
    abort_request_id: str
    def __init__(self, add: _Optional[_Union[AddCommand, _Mapping]] = ..., abort_request_id: _Optional[str] = ...) -> None: ...

class RelayRequest(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[RelayCommand]
    def __init__(self, commands: _Optional[_Iterable[_Union[RelayCommand, _Mapping]]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_id", "kind", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: RequestErrorKind
    message: str
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[RequestErrorKind, str]] = ..., message: _Optional[str] = ...) -> None: ...

class RelayResponse(_message.Message):
    __slots__ = ("responses", "errors")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[_generation_service_pb2.GenerateResponse]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    def __init__(self, responses: _Optional[_Iterable[_Union[_generation_service_pb2.GenerateResponse, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ...) -> None: ...
