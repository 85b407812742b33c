"""SamplingParams and its wire message have the same fields, so the codec needs no edit for a new knob."""

from __future__ import annotations

import dataclasses

import pytest

from pagedserve.contract.codec import sampling_params_from_proto, sampling_params_to_proto
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.v1 import common_pb2


def test_every_sampling_field_has_a_wire_field_of_the_same_name() -> None:
    wire = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(SamplingParams)} == wire


def test_a_field_without_presence_has_its_wire_zero_as_its_default() -> None:
    """The codec reads only the fields a message lists, and proto3 lists no such field at its zero."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    no_presence = [f for f in common_pb2.SamplingParams.DESCRIPTOR.fields if not f.has_presence and not f.is_repeated]
    assert no_presence, "the message has fields without presence"
    assert {f.name: f.default_value for f in no_presence} == {f.name: defaults[f.name] for f in no_presence}


def test_logit_bias_crosses_the_wire_unchanged() -> None:
    params = SamplingParams(logit_bias={3: 1.5, 31999: -100.0}, temperature=0.0)
    assert sampling_params_from_proto(sampling_params_to_proto(params)) == params
    assert dict(sampling_params_to_proto(params).logit_bias) == {3: 1.5, 31999: -100.0}


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: float("nan")}, {-1: 1.0}])
def test_an_out_of_range_logit_bias_is_invalid_and_names_the_field(bias: dict[int, float]) -> None:
    with pytest.raises(InvalidArgumentError, match="^logit_bias: "):
        SamplingParams(logit_bias=bias)


def test_a_logit_bias_token_outside_the_vocabulary_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError, match="^logit_bias: token id 32000 is outside"):
        SamplingParams(logit_bias={32000: 1.0}).validate(vocab_size=32000, max_model_len=64, num_prompt_tokens=4)


def test_a_bias_given_as_a_dict_cannot_be_changed_through_the_params() -> None:
    bias = {1: 1.0}
    params = SamplingParams(logit_bias=bias)
    bias[2] = 2.0
    assert dict(params.logit_bias) == {1: 1.0}
    with pytest.raises(TypeError):
        params.logit_bias[3] = 3.0  # type: ignore[index]
