"""Protobuf <-> domain types of the relay between the frontend and engine processes (EngineService, which carries
GenerationService's responses, model info and status)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.contract.codec import token_logprobs_to_proto
from pagedserve.control_plane.errors import (
    InvalidArgumentError,
    NeverFitsError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.scheduling.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
)
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.v1 import engine_service_pb2, generation_service_pb2

if TYPE_CHECKING:  # only their shapes matter here; the engine imports the scheduler
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

    from pagedserve.control_plane.engine.outputs import Usage
    from pagedserve.control_plane.engine.status import EngineStatus
    from pagedserve.control_plane.text.completion import CompletionChunk

_FINISH_REASONS = {
    FinishReason.STOP: generation_service_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_service_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: generation_service_pb2.FINISH_REASON_ABORT,
}


def add_generate_response(
    responses: RepeatedCompositeFieldContainer[generation_service_pb2.GenerateResponse], chunk: CompletionChunk,
    usage: Usage | None,
) -> generation_service_pb2.GenerateResponse:
    """Appends one chunk of a completion's stream to responses and returns it; usage only on the request's last
    chunk. The message is built in place with only the fields the chunk has (the engine's loop sends one per
    sequence and step). Its sequence_number is left for the frontend, which numbers the messages it actually
    sends (it may merge chunks)."""
    pb = responses.add(request_id=chunk.request_id, index=chunk.completion_index, token_ids=chunk.token_ids,
                       text=chunk.text, stop_reason=chunk.stop_reason)
    if chunk.logprobs:
        pb.logprobs.extend(token_logprobs_to_proto(lp) for lp in chunk.logprobs)
    if chunk.finish_reason is not None:
        pb.finish_reason = _FINISH_REASONS[chunk.finish_reason]
    if usage is not None:
        pb.usage.CopyFrom(_usage_to_proto(usage))
    if chunk.prompt_logprobs:
        pb.prompt_logprobs.extend(token_logprobs_to_proto(lp) for lp in chunk.prompt_logprobs)
    return pb


_ERROR_KINDS: tuple[tuple[type[PagedServeError], engine_service_pb2.RequestErrorKind], ...] = (
    (InvalidArgumentError, engine_service_pb2.REQUEST_ERROR_KIND_INVALID_ARGUMENT),
    (NeverFitsError, engine_service_pb2.REQUEST_ERROR_KIND_NEVER_FITS),  # before its base, ResourceExhaustedError
    (ResourceExhaustedError, engine_service_pb2.REQUEST_ERROR_KIND_RESOURCE_EXHAUSTED),
    (WorkerUnavailableError, engine_service_pb2.REQUEST_ERROR_KIND_WORKER_UNAVAILABLE),
)


def request_error_to_proto(request_id: str, error: PagedServeError) -> engine_service_pb2.RequestError:
    """Why the engine failed a request; an error of no listed kind travels as INTERNAL."""
    kind = next((kind for error_type, kind in _ERROR_KINDS if isinstance(error, error_type)),
                engine_service_pb2.REQUEST_ERROR_KIND_INTERNAL)
    return engine_service_pb2.RequestError(request_id=request_id, kind=kind, message=str(error))


def request_error_from_proto(pb: engine_service_pb2.RequestError) -> PagedServeError:
    """The domain error the engine raised; INTERNAL (and any unknown kind) as a plain PagedServeError, which the
    public service reports as INTERNAL."""
    if pb.kind == engine_service_pb2.REQUEST_ERROR_KIND_INVALID_ARGUMENT:
        field, _, message = pb.message.partition(": ")
        return InvalidArgumentError(field, message)
    error_type = next((t for t, kind in _ERROR_KINDS if kind == pb.kind), PagedServeError)
    return error_type(pb.message)


def served_model_to_proto(model: ServedModel) -> generation_service_pb2.GetModelInfoResponse:
    """The model as GetModelInfo describes it."""
    return generation_service_pb2.GetModelInfoResponse(
        model=model.name, architecture=model.architecture, vocab_size=model.vocab_size,
        max_model_len=model.max_model_len, dtype=model.dtype, block_size=model.block_size,
        num_gpu_blocks=model.num_gpu_blocks, num_workers=model.num_workers, eos_token_ids=model.eos_token_ids,
    )


def served_model_from_proto(pb: generation_service_pb2.GetModelInfoResponse) -> ServedModel:
    """The inverse of served_model_to_proto."""
    return ServedModel(
        name=pb.model, architecture=pb.architecture, dtype=pb.dtype, vocab_size=pb.vocab_size,
        max_model_len=pb.max_model_len, block_size=pb.block_size, num_gpu_blocks=pb.num_gpu_blocks,
        num_workers=pb.num_workers, eos_token_ids=tuple(pb.eos_token_ids),
    )


def engine_status_to_proto(s: EngineStatus) -> generation_service_pb2.GetServerStatusResponse:
    """The engine's status as GetServerStatus reports it (KV cache usage as a fraction)."""
    return generation_service_pb2.GetServerStatusResponse(
        num_requests_running=s.num_requests_running,
        num_requests_waiting=s.num_requests_waiting,
        num_requests_swapped=s.num_requests_swapped,
        kv_cache_usage=s.num_used_blocks / s.num_total_blocks if s.num_total_blocks else 0.0,
        num_used_blocks=s.num_used_blocks,
        num_total_blocks=s.num_total_blocks,
        num_preemptions=s.num_preemptions,
        prefix_cache_queries=s.prefix_cache_queries,
        prefix_cache_hits=s.prefix_cache_hits,
        prompt_tokens=s.num_prompt_tokens,
        generation_tokens=s.num_generation_tokens,
        num_steps=s.num_steps,
        control_plane_step_time_s=s.control_plane_step_time_s,
        worker_step_time_s=s.worker_step_time_s,
        worker_forward_time_s=s.worker_forward_time_s,
        worker_idle_time_s=s.worker_idle_time_s,
    )


def _usage_to_proto(usage: Usage) -> generation_service_pb2.Usage:
    return generation_service_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def kv_event_batch_to_proto(batch: KvEventBatch) -> engine_service_pb2.KvEventBatch:
    """One batch of prefix-cache events as WatchKvEvents sends it."""
    pb = engine_service_pb2.KvEventBatch(sequence_number=batch.sequence_number, timestamp_s=batch.timestamp_s,
                                         events=[_kv_event_to_proto(event) for event in batch.events])
    if batch.snapshot is not None:
        pb.snapshot.CopyFrom(engine_service_pb2.KvSnapshotPart(
            index=batch.snapshot.index, count=batch.snapshot.count, num_blocks=batch.snapshot.num_blocks,
        ))
    return pb


def _kv_event_to_proto(event: KvEvent) -> engine_service_pb2.KvEvent:
    if isinstance(event, BlockStored):
        return engine_service_pb2.KvEvent(stored=engine_service_pb2.KvBlockStored(
            block_hash=event.block_hash, parent_block_hash=event.parent_hash or b"", token_ids=event.token_ids,
        ))
    if isinstance(event, BlockRemoved):
        return engine_service_pb2.KvEvent(removed=engine_service_pb2.KvBlockRemoved(block_hash=event.block_hash))
    assert isinstance(event, AllBlocksCleared)
    return engine_service_pb2.KvEvent(cleared=engine_service_pb2.KvCacheCleared())
