"""vLLM's GenerateRequest (vllm.grpc.engine) -> pagedserve's prompt and SamplingParams: every field is mapped here
or refused with INVALID_ARGUMENT naming it; nothing is ignored."""

from __future__ import annotations

from collections.abc import Sequence

from smg_grpc_proto.generated import vllm_engine_pb2 as vllm

from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.v1 import common_pb2, generation_service_pb2

_MAX_INT32 = 2**31 - 1
_SEED_MODULUS = 2**64  # a negative vLLM seed (int32) becomes a distinct uint64 seed
# Request fields of features this server does not have: set, they are refused.
_UNSUPPORTED_REQUEST_FIELDS = {
    "kv_transfer_params": "KV transfer (prefill/decode disaggregation)",
    "kv_transfer_params_json": "KV transfer (prefill/decode disaggregation)",
    "mm_inputs": "multimodal inputs",
    "media_refs": "multimodal inputs",
}
# Fields copied as they are when set (proto3 zero means "unset" and leaves our default).
_PLAIN_FIELDS = ("min_p", "frequency_penalty", "presence_penalty", "min_tokens", "ignore_eos",
                 "include_stop_str_in_output")


def check_request_fields(request: vllm.GenerateRequest) -> None:
    """InvalidArgumentError for a request-level field of a feature this server does not have."""
    for name, feature in _UNSUPPORTED_REQUEST_FIELDS.items():
        if request.HasField(name):
            raise InvalidArgumentError(name, f"{feature} is not supported by this server")
    if request.extra_mm_inputs:
        raise InvalidArgumentError("extra_mm_inputs", "multimodal inputs are not supported by this server")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise InvalidArgumentError(
            "data_parallel_rank", f"this server has one data-parallel rank (0), got {request.data_parallel_rank}"
        )


def prompt_request(request: vllm.GenerateRequest) -> generation_service_pb2.GenerateRequest:
    """The prompt as our GenerateRequest carries it (text or token ids), with the request id, so the public
    service's bounds and tokenizer apply unchanged."""
    ours = generation_service_pb2.GenerateRequest(request_id=request.request_id)
    which = request.WhichOneof("input")
    if which == "text":
        ours.text = request.text
    elif which == "tokenized":
        ids = request.tokenized.input_ids
        _check_int32(ids, "tokenized.input_ids")
        ours.token_ids.ids.extend(ids)
    return ours


def sampling_params_from_vllm(params: vllm.SamplingParams) -> common_pb2.SamplingParams:
    """Our SamplingParams with vLLM's defaults for what params leaves at zero (temperature 1, top_p 1,
    repetition_penalty 1, n 1, max_tokens up to the context: see truncated_prompt and max_tokens_for)."""
    # spaces_between_special_tokens shapes text this protocol never carries (it returns token ids; the gateway
    # detokenizes), and our stop strings match text decoded as vLLM's fast tokenizers do: it is accepted either way.
    ours = common_pb2.SamplingParams(stop=params.stop, skip_special_tokens=params.skip_special_tokens)
    _copy_constraint(params, ours.structured_output)
    if params.HasField("temperature"):
        ours.temperature = params.temperature
    if params.top_p:
        ours.top_p = params.top_p
    if params.top_k:
        _check_int32([params.top_k], "sampling_params.top_k")
        ours.top_k = params.top_k
    if params.repetition_penalty:
        ours.repetition_penalty = params.repetition_penalty
    for name in _PLAIN_FIELDS:
        value = getattr(params, name)
        if value:
            setattr(ours, name, value)
    if params.HasField("max_tokens"):
        ours.max_tokens = params.max_tokens
    if params.n:
        ours.n = params.n
    _check_int32(params.stop_token_ids, "sampling_params.stop_token_ids")
    ours.stop_token_ids.extend(params.stop_token_ids)
    for name in ("logprobs", "prompt_logprobs"):
        if params.HasField(name):
            value = getattr(params, name)
            if value < 0:
                raise InvalidArgumentError(f"sampling_params.{name}",
                                           f"{value} (all the vocabulary) is not supported: at most 20")
            setattr(ours, name, value)
    if params.HasField("seed"):
        ours.seed = params.seed % _SEED_MODULUS
    for token_id, bias in params.logit_bias.items():
        ours.logit_bias[token_id] = bias
    return ours


def truncated_prompt(prompt_token_ids: tuple[int, ...], params: vllm.SamplingParams,
                     max_model_len: int) -> tuple[int, ...]:
    """The prompt's last truncate_prompt_tokens tokens when that is set (-1: max_model_len), as vLLM keeps them."""
    if not params.HasField("truncate_prompt_tokens"):
        return prompt_token_ids
    keep = params.truncate_prompt_tokens
    if keep == -1:
        keep = max_model_len
    if keep < 1:
        raise InvalidArgumentError("sampling_params.truncate_prompt_tokens", f"must be -1 or at least 1, got {keep}")
    return prompt_token_ids[-keep:]


def max_tokens_for(params: common_pb2.SamplingParams, num_prompt_tokens: int, max_model_len: int) -> None:
    """vLLM's unset max_tokens means up to the context length; our unset one means 16, so it is set to the room
    the prompt leaves (at least 1, so that a prompt that leaves none is refused naming max_tokens)."""
    if not params.HasField("max_tokens"):
        params.max_tokens = max(1, max_model_len - num_prompt_tokens)


def _check_int32(values: Sequence[int], field: str) -> None:
    """Our token ids and top_k are int32; a larger uint32 is refused by name rather than wrapped."""
    largest = max(values, default=0)
    if largest > _MAX_INT32:
        raise InvalidArgumentError(field, f"{largest} is out of range")


def _copy_constraint(params: vllm.SamplingParams, ours: common_pb2.StructuredOutput) -> None:
    """vLLM's structured-output oneof onto ours, field for field (docs/structured-output.md); nothing when unset.
    grammar_from_first_token needs no field: with no reasoning parser, a grammar always holds from the first token."""
    constraint = params.WhichOneof("constraint")
    if constraint == "choice":
        ours.choice.choices.extend(params.choice.choices)
    elif constraint is not None:
        setattr(ours, constraint, getattr(params, constraint))
