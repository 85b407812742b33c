"""Protobuf <-> domain types of the control plane; the only module where both meet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pagedserve.control_plane.errors import (
    InvalidArgumentError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.sampling_params import SamplingParams
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.step_plan import (
    NewSequencePlan,
    SequenceOutput,
    StepOutput,
    StepPlan,
    TokenLogprobs,
    WorkerSampling,
)
from pagedserve.v1 import common_pb2, engine_service_pb2, generation_service_pb2, worker_service_pb2

if TYPE_CHECKING:  # only their shapes matter here; the engine imports the scheduler
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

    from pagedserve.control_plane.text.completion import CompletionChunk
    from pagedserve.control_plane.engine.engine import EngineStatus, Usage
    from pagedserve.control_plane.text.tokenizer import Tokenizer

# Optional proto fields: unset means the SamplingParams default (max_tokens 16, seed None, ...).
_OPTIONAL_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "min_tokens",
    "max_tokens",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
)

_FINISH_REASONS = {
    FinishReason.STOP: generation_service_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_service_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: generation_service_pb2.FINISH_REASON_ABORT,
}


def prompt_from_proto(request: generation_service_pb2.GenerateRequest, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The prompt's token ids: given ones as they are, text through the tokenizer (BOS added)."""
    which = request.WhichOneof("prompt")
    if which == "text":
        if not request.text:
            raise InvalidArgumentError("prompt", "must not be empty")
        return tuple(tokenizer.encode(request.text))
    if which == "token_ids":
        return tuple(request.token_ids.ids)
    raise InvalidArgumentError("prompt", "must be set, as text or token_ids")


def add_generate_response(
    responses: RepeatedCompositeFieldContainer[generation_service_pb2.GenerateResponse], chunk: CompletionChunk,
    usage: Usage | None,
) -> generation_service_pb2.GenerateResponse:
    """Appends one chunk of a completion's stream to responses and returns it; usage only on the request's last
    chunk. The message is built in place with only the fields the chunk has (the engine's loop sends one per
    sequence and step). Its sequence_number is left for the frontend, which numbers the messages it actually
    sends (it may merge chunks)."""
    pb = responses.add(request_id=chunk.request_id, index=chunk.index, token_ids=chunk.token_ids, text=chunk.text,
                       stop_reason=chunk.stop_reason)
    if chunk.logprobs:
        pb.logprobs.extend(token_logprobs_to_proto(lp) for lp in chunk.logprobs)
    if chunk.finish_reason is not None:
        pb.finish_reason = _FINISH_REASONS[chunk.finish_reason]
    if usage is not None:
        pb.usage.CopyFrom(_usage_to_proto(usage))
    if chunk.prompt_logprobs:
        pb.prompt_logprobs.extend(token_logprobs_to_proto(lp) for lp in chunk.prompt_logprobs)
    return pb


_ERROR_KINDS: tuple[tuple[type[PagedServeError], int], ...] = (
    (InvalidArgumentError, engine_service_pb2.REQUEST_ERROR_KIND_INVALID_ARGUMENT),
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


def sampling_params_from_proto(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Request parameters; unset fields (all of them when a request sets none) take vLLM's defaults. Raises
    InvalidArgumentError on bad ranges."""
    optional: dict[str, Any] = {
        name: getattr(pb, name) for name in _OPTIONAL_SAMPLING_FIELDS if pb.HasField(name)
    }
    return SamplingParams(
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        include_stop_str_in_output=pb.include_stop_str_in_output,
        ignore_eos=pb.ignore_eos,
        **optional,
    )


def step_plan_to_proto(plan: StepPlan) -> worker_service_pb2.ExecuteRequest:
    """The wire form of one step, field for field. Scheduled sequences (the per-step bulk) are added in
    place rather than built and copied in."""
    request = worker_service_pb2.ExecuteRequest(
        step_id=plan.step_id,
        dropped_seq_ids=plan.dropped_seq_ids,
        swap_out=_block_mappings(plan.swap_out),
        swap_in=_block_mappings(plan.swap_in),
        block_copies=_block_mappings(plan.block_copies),
        new_sequences=[_new_sequence_to_proto(s) for s in plan.new_sequences],
    )
    add_scheduled = request.scheduled_sequences.add
    for seq in plan.scheduled_sequences:
        message = add_scheduled(seq_id=seq.seq_id, num_scheduled_tokens=seq.num_scheduled_tokens)
        for update in seq.block_table_updates:
            message.block_table_updates.add(start_index=update.start_index, block_ids=update.block_ids)
    return request


def step_output_from_proto(pb: worker_service_pb2.ExecuteResponse) -> StepOutput:
    """A worker's answer to one step, with log-probabilities where the worker sent them."""
    return StepOutput(
        step_id=pb.step_id,
        outputs=tuple(_sequence_output_from_proto(o) for o in pb.outputs),
        step_time_ms=pb.step_time_ms,
        forward_time_ms=pb.forward_time_ms,
        idle_time_ms=pb.idle_time_ms,
    )


def token_logprobs_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top_token_ids=lp.top_token_ids,
        top_logprobs=lp.top_logprobs,
    )


def token_logprobs_from_proto(pb: common_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=pb.token_id,
        logprob=pb.logprob,
        rank=pb.rank,
        top_token_ids=tuple(pb.top_token_ids),
        top_logprobs=tuple(pb.top_logprobs),
    )


def _usage_to_proto(usage: Usage) -> generation_service_pb2.Usage:
    return generation_service_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def _block_mappings(pairs: Sequence[tuple[int, int]]) -> list[worker_service_pb2.BlockMapping]:
    return [worker_service_pb2.BlockMapping(src_block_id=src, dst_block_id=dst) for src, dst in pairs]


def _sampling_to_proto(sampling: WorkerSampling) -> worker_service_pb2.SequenceSampling:
    return worker_service_pb2.SequenceSampling(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        min_tokens=sampling.min_tokens,
        banned_token_ids=sampling.banned_token_ids,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
    )


def _new_sequence_to_proto(seq: NewSequencePlan) -> worker_service_pb2.NewSequence:
    return worker_service_pb2.NewSequence(
        seq_id=seq.seq_id,
        prompt_token_ids=seq.prompt_token_ids,
        output_token_ids=seq.output_token_ids,
        sampling=_sampling_to_proto(seq.sampling),
        block_ids=seq.block_ids,
        num_computed_tokens=seq.num_computed_tokens,
        num_scheduled_tokens=seq.num_scheduled_tokens,
        fork_seq_ids=seq.fork_seq_ids,
        sample_index=seq.sample_index,
    )


def _sequence_output_from_proto(pb: worker_service_pb2.SequenceOutput) -> SequenceOutput:
    return SequenceOutput(
        seq_id=pb.seq_id,
        token_id=pb.token_id if pb.HasField("token_id") else None,
        logprobs=token_logprobs_from_proto(pb.logprobs) if pb.HasField("logprobs") else None,
        prompt_logprobs=tuple(map(token_logprobs_from_proto, pb.prompt_logprobs)) if pb.prompt_logprobs else (),
    )
