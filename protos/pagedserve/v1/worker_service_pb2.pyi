from pagedserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetWorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkerInfoResponse(_message.Message):
    __slots__ = ("worker_id", "model", "architecture", "dtype", "device", "vocab_size", "max_position_embeddings", "weight_bytes", "kv_bytes_per_token", "total_memory_bytes", "is_cache_initialized")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    IS_CACHE_INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    architecture: str
    dtype: str
    device: str
    vocab_size: int
    max_position_embeddings: int
    weight_bytes: int
    kv_bytes_per_token: int
    total_memory_bytes: int
    is_cache_initialized: bool
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., total_memory_bytes: _Optional[int] = ..., is_cache_initialized: _Optional[bool] = ...) -> None: ...

class InitCacheRequest(_message.Message):
    __slots__ = ("block_size", "gpu_memory_utilization", "num_gpu_blocks_override", "kv_cache_memory_bytes", "swap_space_bytes", "max_num_batched_tokens", "max_num_seqs", "max_model_len")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_SPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    gpu_memory_utilization: float
    num_gpu_blocks_override: int
    kv_cache_memory_bytes: int
    swap_space_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    def __init__(self, block_size: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., num_gpu_blocks_override: _Optional[int] = ..., kv_cache_memory_bytes: _Optional[int] = ..., swap_space_bytes: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class InitCacheResponse(_message.Message):
    __slots__ = ("num_gpu_blocks", "num_cpu_blocks", "peak_activation_bytes")
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_gpu_blocks: int
    num_cpu_blocks: int
    peak_activation_bytes: int
    def __init__(self, num_gpu_blocks: _Optional[int] = ..., num_cpu_blocks: _Optional[int] = ..., peak_activation_bytes: _Optional[int] = ...) -> None: ...

class BlockTableUpdate(_message.Message):
    __slots__ = ("start_index", "block_ids")
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    start_index: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start_index: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NewSequence(_message.Message):
    __slots__ = ("seq_id", "prompt_token_ids", "output_token_ids", "block_ids", "num_computed_tokens", "num_scheduled_tokens", "fork_seq_ids", "sample_index", "sampling_params", "banned_token_ids")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORK_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BANNED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    prompt_token_ids: bytes
    output_token_ids: bytes
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    fork_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    sample_index: int
    sampling_params: _common_pb2.SamplingParams
    banned_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[int] = ..., prompt_token_ids: _Optional[bytes] = ..., output_token_ids: _Optional[bytes] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., num_scheduled_tokens: _Optional[int] = ..., fork_seq_ids: _Optional[_Iterable[int]] = ..., sample_index: _Optional[int] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., banned_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ScheduledSequence(_message.Message):
    __slots__ = ("seq_id", "num_scheduled_tokens", "block_table_updates")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    num_scheduled_tokens: int
    block_table_updates: _containers.RepeatedCompositeFieldContainer[BlockTableUpdate]
    def __init__(self, seq_id: _Optional[int] = ..., num_scheduled_tokens: _Optional[int] = ..., block_table_updates: _Optional[_Iterable[_Union[BlockTableUpdate, _Mapping]]] = ...) -> None: ...

class BlockMapping(_message.Message):
    __slots__ = ("src_block_id", "dst_block_id")
    SRC_BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    src_block_id: int
    dst_block_id: int
    def __init__(self, src_block_id: _Optional[int] = ..., dst_block_id: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("step_id", "dropped_seq_ids", "swap_out", "swap_in", "block_copies", "new_sequences", "scheduled_sequences", "decode_seq_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUT_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COPIES_FIELD_NUMBER: _ClassVar[int]
    NEW_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DECODE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    dropped_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    swap_out: _containers.RepeatedCompositeFieldContainer[BlockMapping]
    swap_in: _containers.RepeatedCompositeFieldContainer[BlockMapping]
    block_copies: _containers.RepeatedCompositeFieldContainer[BlockMapping]
    new_sequences: _containers.RepeatedCompositeFieldContainer[NewSequence]
    scheduled_sequences: _containers.RepeatedCompositeFieldContainer[ScheduledSequence]
    decode_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., dropped_seq_ids: _Optional[_Iterable[int]] = ..., swap_out: _Optional[_Iterable[_Union[BlockMapping, _Mapping]]] = ..., swap_in: _Optional[_Iterable[_Union[BlockMapping, _Mapping]]] = ..., block_copies: _Optional[_Iterable[_Union[BlockMapping, _Mapping]]] = ..., new_sequences: _Optional[_Iterable[_Union[NewSequence, _Mapping]]] = ..., scheduled_sequences: _Optional[_Iterable[_Union[ScheduledSequence, _Mapping]]] = ..., decode_seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceOutput(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprobs", "prompt_logprobs", "failure")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprobs: _common_pb2.TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    failure: SequenceFailure
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., failure: _Optional[_Union[SequenceFailure, _Mapping]] = ...) -> None: ...

class SequenceFailure(_message.Message):
    __slots__ = ("field", "message")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    message: str
    def __init__(self, field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("step_id", "outputs", "step_time_ms", "forward_time_ms", "idle_time_ms", "token_seq_ids", "token_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[SequenceOutput]
    step_time_ms: float
    forward_time_ms: float
    idle_time_ms: float
    token_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[SequenceOutput, _Mapping]]] = ..., step_time_ms: _Optional[float] = ..., forward_time_ms: _Optional[float] = ..., idle_time_ms: _Optional[float] = ..., token_seq_ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
