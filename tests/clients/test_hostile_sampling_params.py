"""Random sampling parameters off the wire (ours, and the vLLM engine protocol's that the gateway sends), in range
and out, through the offline LLM on stories260K (CPU).

Each message is either refused with InvalidArgumentError naming a field it set, or generates its n completions
within what it asked (lengths, vocabulary, allowed ids, finish reasons); nothing else may happen, whatever the
combination, and after every request the engine holds no block and no request. The hand-picked cases of
tests/e2e/test_bad_input.py pin each field's message; this pins that no mix of fields gets past validation into
something the engine or the worker cannot finish.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm

from pagedserve.clients.llm import LLM
from pagedserve.contract.codec import sampling_params_from_proto
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.frontend.vllm_engine.convert import (
    max_tokens_for,
    sampling_params_from_vllm,
    truncated_prompt,
)
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.v1 import common_pb2

M = TypeVar("M", bound=Message)
VOCAB = 512  # stories260K
MAX_MODEL_LEN = 512


def _mixed(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly values in range, one draw in five out of it: a message then often sets several fields and is served,
    or fails on one field among several."""
    return st.integers(0, 4).flatmap(lambda k: invalid if k == 4 else valid)


BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -3.0, 1e30])
TOKEN_IDS = _mixed(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, 2**31 - 1]))
WORDS = _mixed(st.sampled_from([" ", "Once", " the", "upon a", "é", "\n", "little girl", "\x00"]), st.just(""))
BIASES = _mixed(st.floats(-100.0, 100.0), st.sampled_from([101.0, math.nan]))
SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
CONSTRAINTS = _mixed(
    st.sampled_from([
        common_pb2.StructuredOutput(regex="[ab]{1,4}"),
        common_pb2.StructuredOutput(json_object=True),
        common_pb2.StructuredOutput(json_schema=SCHEMA),
        common_pb2.StructuredOutput(choice=common_pb2.ChoiceConstraint(choices=["yes", "no"])),
        common_pb2.StructuredOutput(grammar='root ::= "x" | "y"'),
    ]),
    st.sampled_from([
        common_pb2.StructuredOutput(regex="("),
        common_pb2.StructuredOutput(json_schema="{not json"),
        common_pb2.StructuredOutput(choice=common_pb2.ChoiceConstraint(choices=[])),
    ]),
)
# Each field of the wire's SamplingParams with values that fill its range and step past it. Lengths stay small
# (max_tokens at most 12, min_tokens at most 14) so that an example runs in milliseconds.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "n": _mixed(st.integers(1, 3), st.sampled_from([0, 300])),
    "temperature": _mixed(st.sampled_from([0.0, 1e-6, 0.7, 1.0, 50.0]), BAD_FLOATS),
    "top_p": _mixed(st.sampled_from([1e-6, 0.05, 0.9, 1.0]), st.sampled_from([0.0, 1.5, math.nan])),
    "top_k": _mixed(st.sampled_from([-1, 0, 1, 5, VOCAB, VOCAB + 100, 2**31 - 1]), st.just(-2)),
    "min_p": _mixed(st.sampled_from([0.0, 0.2, 1.0]), BAD_FLOATS),
    "presence_penalty": _mixed(st.floats(-2.0, 2.0), BAD_FLOATS),
    "frequency_penalty": _mixed(st.floats(-2.0, 2.0), BAD_FLOATS),
    "repetition_penalty": _mixed(st.sampled_from([1e-3, 0.5, 1.0, 1.3, 1e3]), st.sampled_from([0.0, -1.0, math.nan])),
    "seed": st.sampled_from([0, 1, 2**63, 2**64 - 1]),
    "stop": st.lists(WORDS, max_size=3),
    "stop_token_ids": st.lists(TOKEN_IDS, max_size=3),
    "include_stop_str_in_output": st.booleans(),
    "ignore_eos": st.booleans(),
    "min_tokens": _mixed(st.integers(0, 8), st.integers(13, 14)),
    "max_tokens": _mixed(st.integers(1, 12), st.just(0)),
    "logprobs": _mixed(st.sampled_from([0, 1, 5, 20]), st.just(21)),
    "prompt_logprobs": _mixed(st.sampled_from([0, 2, 20]), st.just(21)),
    "skip_special_tokens": st.booleans(),
    "logit_bias": st.dictionaries(TOKEN_IDS, BIASES, max_size=3),
    "allowed_token_ids": st.lists(TOKEN_IDS, max_size=4),
    "bad_words": st.lists(WORDS, max_size=3),
    "spaces_between_special_tokens": st.booleans(),
    "truncate_prompt_tokens": _mixed(st.sampled_from([-1, 1, 8]), st.sampled_from([-2, 0, 600])),
    "best_of": st.sampled_from([0, 1, 2, 3]),
    "structured_output": CONSTRAINTS,
}


def _message(draw: st.DrawFn, message: M, fields: dict[str, st.SearchStrategy[Any]]) -> M:
    """message with a random few of fields set to values drawn from their strategies (a constraint's strategy
    gives the oneof member's name and value)."""
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=9, unique=True)):
        value = draw(fields[name])
        if name == "constraint":
            name, value = value
        if isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        elif isinstance(value, dict):
            getattr(message, name).update(value)
        elif isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


@st.composite
def wire_params(draw: st.DrawFn) -> common_pb2.SamplingParams:
    """Our SamplingParams message with a random few of its fields set, max_tokens among them."""
    return _message(draw, common_pb2.SamplingParams(max_tokens=8), FIELDS)


UINT32_EDGES = st.sampled_from([0, 2**31, 2**32 - 1])
VLLM_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "temperature": FIELDS["temperature"],
    "top_p": FIELDS["top_p"],
    "top_k": _mixed(st.sampled_from([0, 1, 5, VOCAB + 100]), UINT32_EDGES),
    "min_p": FIELDS["min_p"],
    "frequency_penalty": FIELDS["frequency_penalty"],
    "presence_penalty": FIELDS["presence_penalty"],
    "repetition_penalty": FIELDS["repetition_penalty"],
    "max_tokens": FIELDS["max_tokens"],
    "min_tokens": _mixed(st.integers(0, 8), UINT32_EDGES),
    "stop": FIELDS["stop"],
    "stop_token_ids": st.lists(_mixed(st.integers(0, VOCAB - 1), UINT32_EDGES), max_size=3),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "ignore_eos": st.booleans(),
    "n": _mixed(st.integers(0, 3), UINT32_EDGES),
    "logprobs": _mixed(st.sampled_from([0, 1, 20]), st.sampled_from([-1, 21, -(2**31)])),
    "prompt_logprobs": _mixed(st.sampled_from([0, 2, 20]), st.sampled_from([-1, 21])),
    "seed": st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]),
    "include_stop_str_in_output": st.booleans(),
    "logit_bias": st.dictionaries(_mixed(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, -(2**31)])),
                                  BIASES, max_size=3),
    "truncate_prompt_tokens": _mixed(st.sampled_from([-1, 1, 8]), st.sampled_from([-2, 0, 600])),
    "grammar_from_first_token": st.booleans(),
    "constraint": st.sampled_from([
        ("regex", "[ab]{1,4}"), ("regex", "("), ("json_object", True), ("json_schema", SCHEMA),
        ("json_schema", "{not json"), ("grammar", 'root ::= "x" | "y"'),
        ("choice", vllm.ChoiceConstraint(choices=["yes", "no"])), ("choice", vllm.ChoiceConstraint()),
    ]),
}


@st.composite
def vllm_params(draw: st.DrawFn) -> vllm.SamplingParams:
    """A vLLM engine protocol SamplingParams message with a random few of its fields set, max_tokens among them
    (unset, it would run to the context length)."""
    return _message(draw, vllm.SamplingParams(max_tokens=8), VLLM_FIELDS)


@pytest.fixture(scope="module")
def llm(stories260k_dir: Path) -> Iterator[LLM]:
    with LLM(stories260k_dir, device="cpu", worker_process=False,
             cache_config=CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0)) as served:
        yield served


def _root(field: str) -> str:
    """The top-level parameter an error names: "structured_output" of "structured_output.regex", "top_k" of the
    vLLM engine service's "sampling_params.top_k"."""
    return field.removeprefix("sampling_params.").split(".")[0].split("[")[0]


def _served_or_refused(llm: LLM, admit: Callable[[], tuple[SamplingParams, list[int]]], set_fields: set[str]) -> None:
    """admit() (the parameters and the prompt as a service admits them) and the generation it asks for either raise
    InvalidArgumentError naming one of set_fields (or the prompt), or give n completions within the request's limits;
    either way the engine is left empty."""
    try:
        params, prompt = admit()
        (output,) = llm.generate([prompt], params, use_tqdm=False)
    except InvalidArgumentError as error:
        assert _root(error.field) in set_fields | {"prompt"}, (error, set_fields)
        assert error.message
    else:
        assert len(output.outputs) == params.n
        for completion in output.outputs:
            assert completion.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), completion
            assert params.max_tokens is not None and len(completion.token_ids) <= params.max_tokens
            assert all(0 <= token_id < VOCAB for token_id in completion.token_ids)
            if params.allowed_token_ids:
                assert set(completion.token_ids) <= set(params.allowed_token_ids), completion.token_ids
    status = llm.status()
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)


PROMPTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(message=wire_params(), prompt=PROMPTS)
def test_any_sampling_params_are_refused_by_name_or_served_within_their_limits(
    llm: LLM, message: common_pb2.SamplingParams, prompt: list[int],
) -> None:
    set_fields = {descriptor.name for descriptor, _ in message.ListFields()}
    _served_or_refused(llm, lambda: (sampling_params_from_proto(message), prompt), set_fields)


@FUZZ
@given(message=vllm_params(), prompt=PROMPTS)
def test_any_vllm_engine_protocol_sampling_params_are_refused_by_name_or_served_within_their_limits(
    llm: LLM, message: vllm.SamplingParams, prompt: list[int],
) -> None:
    """The gateway's parameters, converted as the vLLM engine service converts them (after tokenizing)."""
    set_fields = {descriptor.name for descriptor, _ in message.ListFields()}
    set_fields |= {"structured_output"} if message.WhichOneof("constraint") else set()

    def admit() -> tuple[SamplingParams, list[int]]:
        ours = sampling_params_from_vllm(message)
        kept = list(truncated_prompt(tuple(prompt), message, MAX_MODEL_LEN))
        max_tokens_for(ours, len(kept), MAX_MODEL_LEN)
        return sampling_params_from_proto(ours), kept

    _served_or_refused(llm, admit, set_fields)


@pytest.mark.parametrize(("params", "field", "causes"), [
    # The fuzz's first find: the regex needs an "a" or a "b", and only token 1 is allowed.
    (common_pb2.SamplingParams(allowed_token_ids=[1], structured_output=common_pb2.StructuredOutput(regex="[ab]+")),
     "structured_output", "structured_output and allowed_token_ids"),
    # End-of-sequence is the one token allowed, and min_tokens bans it for the first two outputs.
    (common_pb2.SamplingParams(allowed_token_ids=[2], min_tokens=2), "allowed_token_ids",
     "allowed_token_ids and min_tokens"),
    # The same for three completions sampled at random: the siblings' rows are each left without a token.
    (common_pb2.SamplingParams(n=3, temperature=1.0, seed=5, allowed_token_ids=[2], min_tokens=2),
     "allowed_token_ids", "allowed_token_ids and min_tokens"),
])
def test_constraints_that_leave_no_token_end_the_request_naming_them(
    llm: LLM, params: common_pb2.SamplingParams, field: str, causes: str,
) -> None:
    plain = sampling_params_from_proto(common_pb2.SamplingParams(temperature=0.0, max_tokens=8))
    before = llm.generate([[1, 400, 20]], plain, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(InvalidArgumentError) as raised:
        llm.generate([[1, 400, 20]], sampling_params_from_proto(params), use_tqdm=False)
    assert raised.value.field == field
    assert f"no token satisfies {causes} at once" in raised.value.message
    status = llm.status()
    assert (status.num_used_blocks, status.num_requests_running, status.num_requests_waiting) == (0, 0, 0)
    assert llm.generate([[1, 400, 20]], plain, use_tqdm=False)[0].outputs[0].token_ids == before
