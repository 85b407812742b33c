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
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "priority", "arrival_time_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: bytes
    sampling_params: _common_pb2.SamplingParams
    priority: int
    arrival_time_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[bytes] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., arrival_time_s: _Optional[float] = ...) -> None: ...

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

class WatchKvEventsRequest(_message.Message):
    __slots__ = ("start_sequence_number",)
    START_SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    start_sequence_number: int
    def __init__(self, start_sequence_number: _Optional[int] = ...) -> None: ...

class WatchKvEventsResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[KvEventBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[KvEventBatch, _Mapping]]] = ...) -> None: ...

class KvEventBatch(_message.Message):
    __slots__ = ("sequence_number", "timestamp_s", "events", "snapshot")
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    sequence_number: int
    timestamp_s: float
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    snapshot: KvSnapshotPart
    def __init__(self, sequence_number: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ..., snapshot: _Optional[_Union[KvSnapshotPart, _Mapping]] = ...) -> None: ...

class KvSnapshotPart(_message.Message):
    __slots__ = ("index", "count", "num_blocks")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    num_blocks: int
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("stored", "removed", "cleared")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    stored: KvBlockStored
    removed: KvBlockRemoved
    cleared: KvCacheCleared
    def __init__(self, stored: _Optional[_Union[KvBlockStored, _Mapping]] = ..., removed: _Optional[_Union[KvBlockRemoved, _Mapping]] = ..., cleared: _Optional[_Union[KvCacheCleared, _Mapping]] = ...) -> None: ...

class KvBlockStored(_message.Message):
    __slots__ = ("block_hash", "parent_block_hash", "token_ids")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    parent_block_hash: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hash: _Optional[bytes] = ..., parent_block_hash: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KvBlockRemoved(_message.Message):
    __slots__ = ("block_hash",)
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    def __init__(self, block_hash: _Optional[bytes] = ...) -> None: ...

class KvCacheCleared(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
