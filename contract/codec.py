"""The one protobuf codec of the contract's values: sampling parameters, log-probabilities, steps and their
results, worker and cache info. Decoding validates (InvalidArgumentError naming the field): each process that
receives these messages is a trust boundary of its own."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import (
    BlockTableUpdate,
    NewSequence,
    ScheduledSequence,
    SequenceFailure,
    SequenceOutput,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.v1 import common_pb2, worker_service_pb2


class _FieldKind(enum.Enum):
    SCALAR = "scalar"  # as it is
    REPEATED = "repeated"  # a tuple
    MAP = "map"  # a mapping
    CONSTRAINT = "constraint"  # the StructuredOutput message


def _field_kind(field: FieldDescriptor) -> _FieldKind:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return _FieldKind.MAP
    if field.message_type is common_pb2.StructuredOutput.DESCRIPTOR:
        return _FieldKind.CONSTRAINT
    return _FieldKind.REPEATED if field.is_repeated else _FieldKind.SCALAR


# SamplingParams' fields and the proto message's are the same names (a test holds them to it), so a new knob needs
# no edit here: the wire form is read off the message's descriptor.
_SAMPLING_KINDS = {f.name: _field_kind(f) for f in common_pb2.SamplingParams.DESCRIPTOR.fields}


def sampling_params_from_proto(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Parameters with every unset field at vLLM's default; InvalidArgumentError on a bad range.

    Only the fields set on the wire are read (ListFields): a request sets a few of the 25, and this runs on every
    request's path in the frontend, the engine and the worker. A scalar without presence at its zero is not listed,
    and its zero is the SamplingParams default (a test holds them to it)."""
    values: dict[str, Any] = {}
    for field, value in pb.ListFields():
        kind = _SAMPLING_KINDS[field.name]
        if kind is _FieldKind.REPEATED:
            values[field.name] = tuple(value)
        elif kind is _FieldKind.MAP:
            values[field.name] = dict(value)
        elif kind is _FieldKind.CONSTRAINT:
            values[field.name] = structured_output_from_proto(value)
        else:
            values[field.name] = value
    return SamplingParams(**values)


def token_ids_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as the internal messages carry them: 4-byte little-endian signed, packed (a third of a repeated
    field's time to build and to read back in Python). struct.error for an id outside int32."""
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


def token_ids_from_bytes(data: bytes, field: str) -> tuple[int, ...]:
    """The inverse of token_ids_to_bytes; InvalidArgumentError naming the field when data is not whole ids."""
    if len(data) % 4:
        raise InvalidArgumentError(field, f"must be 4-byte token ids, got {len(data)} bytes")
    return struct.unpack(f"<{len(data) // 4}i", data)


def sampling_params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """The inverse of sampling_params_from_proto. max_tokens None (up to the context length) has no wire form
    and travels unset; only the worker receives parameters this way, and it does not read max_tokens."""
    values = {name: getattr(params, name) for name in _SAMPLING_KINDS}
    if params.structured_output is not None:
        values["structured_output"] = structured_output_to_proto(params.structured_output)
    return common_pb2.SamplingParams(**{name: value for name, value in values.items() if value is not None})


def structured_output_from_proto(pb: common_pb2.StructuredOutput) -> StructuredOutput:
    """The constraint; InvalidArgumentError naming the field when none is set or json_object is false."""
    which = pb.WhichOneof("constraint")
    if which is None:
        raise InvalidArgumentError("structured_output", "must set one constraint")
    kind = ConstraintKind(which)
    if kind is ConstraintKind.JSON_OBJECT and not pb.json_object:
        raise InvalidArgumentError("structured_output.json_object", "must be true when set")
    is_text = kind not in (ConstraintKind.JSON_OBJECT, ConstraintKind.CHOICE)
    return StructuredOutput(
        kind,
        spec=getattr(pb, which) if is_text else "",
        choices=tuple(pb.choice.choices) if kind is ConstraintKind.CHOICE else (),
        disable_any_whitespace=pb.disable_any_whitespace,
        disable_additional_properties=pb.disable_additional_properties,
    )


def structured_output_to_proto(output: StructuredOutput) -> common_pb2.StructuredOutput:
    message = common_pb2.StructuredOutput(
        disable_any_whitespace=output.disable_any_whitespace,
        disable_additional_properties=output.disable_additional_properties,
    )
    if output.kind is ConstraintKind.JSON_OBJECT:
        message.json_object = True
    elif output.kind is ConstraintKind.CHOICE:
        message.choice.choices.extend(output.choices)
    else:
        setattr(message, output.kind.value, output.spec)
    return message


def token_logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, top_token_ids=lp.top_token_ids,
        top_logprobs=lp.top_logprobs,
    )


def token_logprobs_from_proto(pb: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=pb.token_id, logprob=pb.logprob, rank=pb.rank, top_token_ids=tuple(pb.top_token_ids),
        top_logprobs=tuple(pb.top_logprobs),
    )


def step_plan_to_proto(plan: StepPlan) -> worker_service_pb2.ExecuteRequest:
    """The wire form of one step, which step_plan_from_proto reads back as it is, order included (the ranks of a
    tensor-parallel group must lay out the same batch). The scheduled sequences after the last one that is more than
    a plain decode (one token, no table update) travel packed in decode_seq_ids; the control plane plans plain
    decodes last (StepBuilder), so that is the per-step bulk. The others are messages added in place rather than
    built and copied in."""
    scheduled = plan.scheduled_sequences
    first_packed = len(scheduled)
    while first_packed and scheduled[first_packed - 1].is_plain_decode:
        first_packed -= 1
    request = worker_service_pb2.ExecuteRequest(
        step_id=plan.step_id,
        dropped_seq_ids=plan.dropped_seq_ids,
        swap_out=_block_mappings(plan.swap_out),
        swap_in=_block_mappings(plan.swap_in),
        block_copies=_block_mappings(plan.block_copies),
        new_sequences=[_new_sequence_to_proto(s) for s in plan.new_sequences],
    )
    add_scheduled = request.scheduled_sequences.add
    for seq_id, num_scheduled_tokens, updates in scheduled[:first_packed]:
        message = add_scheduled(seq_id=seq_id, num_scheduled_tokens=num_scheduled_tokens)
        for update in updates:
            message.block_table_updates.add(start_index=update.start_index, block_ids=update.block_ids)
    request.decode_seq_ids.extend([seq.seq_id for seq in scheduled[first_packed:]])
    return request


def step_plan_from_proto(pb: worker_service_pb2.ExecuteRequest) -> StepPlan:
    """The step as plain data, the packed decodes after the scheduled_sequences messages; InvalidArgumentError when a
    new sequence's sampling parameters are out of range."""
    return StepPlan(
        step_id=pb.step_id,
        dropped_seq_ids=tuple(pb.dropped_seq_ids),
        swap_out=_mappings(pb.swap_out),
        swap_in=_mappings(pb.swap_in),
        block_copies=_mappings(pb.block_copies),
        new_sequences=tuple(_new_sequence_from_proto(s) for s in pb.new_sequences),
        scheduled_sequences=(
            *[ScheduledSequence(s.seq_id, s.num_scheduled_tokens,
                                _table_updates(updates) if (updates := s.block_table_updates) else ())
              for s in pb.scheduled_sequences],
            *[ScheduledSequence(seq_id, 1) for seq_id in pb.decode_seq_ids],
        ),
    )


def step_result_to_proto(result: StepResult) -> worker_service_pb2.ExecuteResponse:
    """The wire form of one step's result: the outputs that are a sampled token alone (the per-step bulk) travel
    packed in token_seq_ids and token_ids, the others as messages."""
    response = worker_service_pb2.ExecuteResponse(
        step_id=result.step_id, step_time_ms=result.step_time_ms, forward_time_ms=result.forward_time_ms,
        idle_time_ms=result.idle_time_ms,
    )
    token_seq_ids, token_ids = [], []
    add_output = response.outputs.add
    for seq_id, token_id, logprobs, prompt_logprobs, failure in result.outputs:
        if token_id is not None and logprobs is None and not prompt_logprobs and failure is None:
            token_seq_ids.append(seq_id)
            token_ids.append(token_id)
            continue
        output = add_output(seq_id=seq_id, token_id=token_id)  # token_id None stays unset
        if logprobs is not None:
            output.logprobs.CopyFrom(token_logprobs_to_proto(logprobs))
        if prompt_logprobs:
            output.prompt_logprobs.extend(map(token_logprobs_to_proto, prompt_logprobs))
        if failure is not None:
            output.failure.field, output.failure.message = failure
    response.token_seq_ids.extend(token_seq_ids)
    response.token_ids.extend(token_ids)
    return response


def step_result_from_proto(pb: worker_service_pb2.ExecuteResponse) -> StepResult:
    """The step's result as plain data; ValueError when its packed token columns differ in length."""
    if len(pb.token_seq_ids) != len(pb.token_ids):
        raise ValueError(f"step {pb.step_id}: {len(pb.token_seq_ids)} token_seq_ids but {len(pb.token_ids)} token_ids")
    return StepResult(
        step_id=pb.step_id,
        outputs=(*map(_sequence_output_from_proto, pb.outputs),
                 *map(SequenceOutput, pb.token_seq_ids, pb.token_ids)),
        step_time_ms=pb.step_time_ms,
        forward_time_ms=pb.forward_time_ms,
        idle_time_ms=pb.idle_time_ms,
    )


def cache_request_to_proto(request: CacheRequest) -> worker_service_pb2.InitCacheRequest:
    return worker_service_pb2.InitCacheRequest(
        block_size=request.block_size,
        gpu_memory_utilization=request.gpu_memory_utilization,
        num_gpu_blocks_override=request.num_gpu_blocks_override,
        kv_cache_memory_bytes=request.kv_cache_memory_bytes,
        swap_space_bytes=request.swap_space_bytes,
        max_num_batched_tokens=request.max_num_batched_tokens,
        max_num_seqs=request.max_num_seqs,
        max_model_len=request.max_model_len or 0,
    )


# CacheRequest's defaults (block_size has none; 1 is only a valid placeholder), read where a proto3 zero means unset.
_CACHE_REQUEST_DEFAULTS = CacheRequest(block_size=1)


def cache_request_from_proto(pb: worker_service_pb2.InitCacheRequest) -> CacheRequest:
    """CacheRequest; proto3 zeros mean unset, and those fields keep CacheRequest's defaults."""
    defaults = _CACHE_REQUEST_DEFAULTS
    return CacheRequest(
        block_size=pb.block_size,
        gpu_memory_utilization=pb.gpu_memory_utilization or defaults.gpu_memory_utilization,
        num_gpu_blocks_override=pb.num_gpu_blocks_override if pb.HasField("num_gpu_blocks_override") else None,
        kv_cache_memory_bytes=pb.kv_cache_memory_bytes,
        swap_space_bytes=pb.swap_space_bytes,
        max_num_batched_tokens=pb.max_num_batched_tokens or defaults.max_num_batched_tokens,
        max_num_seqs=pb.max_num_seqs or defaults.max_num_seqs,
        max_model_len=pb.max_model_len or None,
    )


def cache_info_to_proto(info: CacheInfo) -> worker_service_pb2.InitCacheResponse:
    return worker_service_pb2.InitCacheResponse(
        num_gpu_blocks=info.num_gpu_blocks, num_cpu_blocks=info.num_cpu_blocks,
        peak_activation_bytes=info.peak_activation_bytes,
    )


def cache_info_from_proto(pb: worker_service_pb2.InitCacheResponse) -> CacheInfo:
    return CacheInfo(
        num_gpu_blocks=pb.num_gpu_blocks, num_cpu_blocks=pb.num_cpu_blocks,
        peak_activation_bytes=pb.peak_activation_bytes,
    )


def worker_info_to_proto(info: WorkerInfo) -> worker_service_pb2.GetWorkerInfoResponse:
    return worker_service_pb2.GetWorkerInfoResponse(
        worker_id=info.worker_id, model=info.model, architecture=info.architecture, dtype=info.dtype,
        device=info.device, vocab_size=info.vocab_size, max_position_embeddings=info.max_position_embeddings,
        weight_bytes=info.weight_bytes, kv_bytes_per_token=info.kv_bytes_per_token,
        total_memory_bytes=info.total_memory_bytes, is_cache_initialized=info.is_cache_initialized,
    )


def worker_info_from_proto(pb: worker_service_pb2.GetWorkerInfoResponse) -> WorkerInfo:
    return WorkerInfo(
        worker_id=pb.worker_id, model=pb.model, architecture=pb.architecture, dtype=pb.dtype, device=pb.device,
        vocab_size=pb.vocab_size, max_position_embeddings=pb.max_position_embeddings,
        weight_bytes=pb.weight_bytes, kv_bytes_per_token=pb.kv_bytes_per_token,
        total_memory_bytes=pb.total_memory_bytes, is_cache_initialized=pb.is_cache_initialized,
    )


def _block_mappings(pairs: Sequence[tuple[int, int]]) -> list[worker_service_pb2.BlockMapping]:
    return [worker_service_pb2.BlockMapping(src_block_id=src, dst_block_id=dst) for src, dst in pairs]


def _mappings(rows: Iterable[worker_service_pb2.BlockMapping]) -> tuple[tuple[int, int], ...]:
    return tuple((row.src_block_id, row.dst_block_id) for row in rows)


def _table_updates(rows: Iterable[worker_service_pb2.BlockTableUpdate]) -> tuple[BlockTableUpdate, ...]:
    return tuple([BlockTableUpdate(row.start_index, tuple(row.block_ids)) for row in rows])


def _new_sequence_to_proto(seq: NewSequence) -> worker_service_pb2.NewSequence:
    return worker_service_pb2.NewSequence(
        seq_id=seq.seq_id,
        prompt_token_ids=token_ids_to_bytes(seq.prompt_token_ids),
        output_token_ids=token_ids_to_bytes(seq.output_token_ids),
        sampling_params=sampling_params_to_proto(seq.sampling_params),
        banned_token_ids=seq.banned_token_ids,
        block_ids=seq.block_ids,
        num_computed_tokens=seq.num_computed_tokens,
        num_scheduled_tokens=seq.num_scheduled_tokens,
        fork_seq_ids=seq.fork_seq_ids,
        sample_index=seq.sample_index,
    )


def _new_sequence_from_proto(pb: worker_service_pb2.NewSequence) -> NewSequence:
    return NewSequence(
        seq_id=pb.seq_id,
        prompt_token_ids=token_ids_from_bytes(pb.prompt_token_ids, "new_sequences.prompt_token_ids"),
        output_token_ids=token_ids_from_bytes(pb.output_token_ids, "new_sequences.output_token_ids"),
        sampling_params=sampling_params_from_proto(pb.sampling_params),
        banned_token_ids=tuple(pb.banned_token_ids),
        block_ids=tuple(pb.block_ids),
        num_computed_tokens=pb.num_computed_tokens,
        num_scheduled_tokens=pb.num_scheduled_tokens,
        fork_seq_ids=tuple(pb.fork_seq_ids),
        sample_index=pb.sample_index,
    )


def _sequence_output_from_proto(pb: worker_service_pb2.SequenceOutput) -> SequenceOutput:
    return SequenceOutput(
        seq_id=pb.seq_id,
        token_id=pb.token_id if pb.HasField("token_id") else None,
        logprobs=token_logprobs_from_proto(pb.logprobs) if pb.HasField("logprobs") else None,
        prompt_logprobs=tuple(map(token_logprobs_from_proto, pb.prompt_logprobs)) if pb.prompt_logprobs else (),
        failure=SequenceFailure(pb.failure.field, pb.failure.message) if pb.HasField("failure") else None,
    )
