"""Protobuf <-> worker domain objects for WorkerService; the only place that reads or builds *_pb2 messages."""

from __future__ import annotations

from collections.abc import Iterable

from pagedserve.gpu_worker.errors import InvalidCacheRequestError, InvalidStepError
from pagedserve.gpu_worker.sampler import SamplingOptions, TokenLogprobs
from pagedserve.gpu_worker.step import (
    CacheInfo,
    CacheRequest,
    NewSequence,
    ScheduledSequence,
    StepRequest,
    StepResult,
    TableUpdate,
    WorkerInfo,
)
from pagedserve.v1 import common_pb2, worker_service_pb2


def sampling_from_proto(message: worker_service_pb2.SequenceSampling) -> SamplingOptions:
    """SamplingOptions; a zero top_p or repetition_penalty is proto3's unset value and means 'off'."""
    try:
        return SamplingOptions(
            temperature=message.temperature,
            top_p=message.top_p or 1.0,
            top_k=message.top_k,
            min_p=message.min_p,
            presence_penalty=message.presence_penalty,
            frequency_penalty=message.frequency_penalty,
            repetition_penalty=message.repetition_penalty or 1.0,
            seed=message.seed if message.HasField("seed") else None,
            min_tokens=message.min_tokens,
            banned_token_ids=tuple(message.banned_token_ids),
            logprobs=message.logprobs if message.HasField("logprobs") else None,
            prompt_logprobs=message.prompt_logprobs if message.HasField("prompt_logprobs") else None,
        )
    except ValueError as error:
        raise InvalidStepError(f"sampling: {error}") from None


def _mappings(rows: Iterable[worker_service_pb2.BlockMapping]) -> tuple[tuple[int, int], ...]:
    return tuple((row.src_block_id, row.dst_block_id) for row in rows)


def _new_sequence(message: worker_service_pb2.NewSequence) -> NewSequence:
    return NewSequence(
        seq_id=message.seq_id,
        prompt_token_ids=tuple(message.prompt_token_ids),
        output_token_ids=tuple(message.output_token_ids),
        options=sampling_from_proto(message.sampling),
        block_ids=tuple(message.block_ids),
        num_computed_tokens=message.num_computed_tokens,
        num_scheduled_tokens=message.num_scheduled_tokens,
        fork_seq_ids=tuple(message.fork_seq_ids),
        sample_index=message.sample_index,
    )


def _scheduled_sequence(message: worker_service_pb2.ScheduledSequence) -> ScheduledSequence:
    updates = tuple(TableUpdate(u.start_index, tuple(u.block_ids)) for u in message.block_table_updates)
    return ScheduledSequence(message.seq_id, message.num_scheduled_tokens, updates)


def step_from_proto(message: worker_service_pb2.ExecuteRequest) -> StepRequest:
    """The step as plain data; InvalidStepError when its sampling options are out of range."""
    return StepRequest(
        step_id=message.step_id,
        dropped_seq_ids=tuple(message.dropped_seq_ids),
        swap_out=_mappings(message.swap_out),
        swap_in=_mappings(message.swap_in),
        block_copies=_mappings(message.block_copies),
        new_sequences=tuple(_new_sequence(s) for s in message.new_sequences),
        scheduled_sequences=tuple(_scheduled_sequence(s) for s in message.scheduled_sequences),
    )


def _logprobs_to_proto(logprobs: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        rank=logprobs.rank,
        top_token_ids=logprobs.top_token_ids,
        top_logprobs=logprobs.top_logprobs,
    )


def step_result_to_proto(result: StepResult) -> worker_service_pb2.ExecuteResponse:
    outputs = []
    for item in result.results:
        output = worker_service_pb2.SequenceOutput(
            seq_id=item.seq_id, prompt_logprobs=[_logprobs_to_proto(p) for p in item.prompt_logprobs]
        )
        if item.token_id is not None:
            output.token_id = item.token_id
        if item.logprobs is not None:
            output.logprobs.CopyFrom(_logprobs_to_proto(item.logprobs))
        outputs.append(output)
    return worker_service_pb2.ExecuteResponse(
        step_id=result.step_id,
        outputs=outputs,
        step_time_ms=result.step_time_ms,
        forward_time_ms=result.forward_time_ms,
        idle_time_ms=result.idle_time_ms,
    )


def cache_request_from_proto(message: worker_service_pb2.InitCacheRequest) -> CacheRequest:
    """CacheRequest; InvalidCacheRequestError for a block size that is not a power of two."""
    block_size = message.block_size
    if block_size <= 0 or block_size & (block_size - 1):
        raise InvalidCacheRequestError(f"block_size must be a power of two, got {block_size}")
    # proto3 zeros mean "unset": those fields keep CacheRequest's defaults.
    optional = {
        "gpu_memory_utilization": message.gpu_memory_utilization,
        "max_num_batched_tokens": message.max_num_batched_tokens,
        "max_num_seqs": message.max_num_seqs,
    }
    return CacheRequest(
        block_size=block_size,
        num_gpu_blocks_override=(
            message.num_gpu_blocks_override if message.HasField("num_gpu_blocks_override") else None
        ),
        kv_cache_memory_bytes=message.kv_cache_memory_bytes,
        swap_space_bytes=message.swap_space_bytes,
        max_model_len=message.max_model_len or None,
        **{name: value for name, value in optional.items() if value},
    )


def cache_info_to_proto(info: CacheInfo) -> worker_service_pb2.InitCacheResponse:
    return worker_service_pb2.InitCacheResponse(
        num_gpu_blocks=info.num_gpu_blocks,
        num_cpu_blocks=info.num_cpu_blocks,
        peak_activation_bytes=info.peak_activation_bytes,
    )


def worker_info_to_proto(info: WorkerInfo) -> worker_service_pb2.GetWorkerInfoResponse:
    return worker_service_pb2.GetWorkerInfoResponse(
        worker_id=info.worker_id,
        model=info.model,
        architecture=info.architecture,
        dtype=info.dtype,
        device=info.device,
        vocab_size=info.vocab_size,
        max_position_embeddings=info.max_position_embeddings,
        weight_bytes=info.weight_bytes,
        kv_bytes_per_token=info.kv_bytes_per_token,
        total_memory_bytes=info.total_memory_bytes,
        is_cache_initialized=info.is_cache_initialized,
    )
