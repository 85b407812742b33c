"""Every range check of SamplingParams and of prompts raises InvalidArgumentError naming the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.sampling_params import SamplingParams, validate_prompt

VOCAB_SIZE = 100
MAX_MODEL_LEN = 64

BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    ({"n": 0}, "n", "n: must be in [1, 256], got 0"),
    ({"n": 257}, "n", "n: must be in [1, 256], got 257"),
    ({"temperature": -1.0}, "temperature", "temperature: must be non-negative, got -1.0"),
    ({"temperature": math.nan}, "temperature", "temperature: must be non-negative, got nan"),
    ({"temperature": math.inf}, "temperature", "temperature: must be non-negative, got inf"),
    ({"top_p": 0.0}, "top_p", "top_p: must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p", "top_p: must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k", "top_k: must be -1 or 0 (no limit) or at least 1, got -2"),
    ({"min_p": -0.1}, "min_p", "min_p: must be in [0.0, 1.0], got -0.1"),
    ({"min_p": 1.1}, "min_p", "min_p: must be in [0.0, 1.0], got 1.1"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty: must be in [-2.0, 2.0], got 2.5"),
    ({"presence_penalty": -2.5}, "presence_penalty", "presence_penalty: must be in [-2.0, 2.0], got -2.5"),
    ({"frequency_penalty": 3.0}, "frequency_penalty", "frequency_penalty: must be in [-2.0, 2.0], got 3.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "repetition_penalty: must be positive, got 0.0"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: must be at least 1, got 0"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens: must be non-negative, got -1"),
    ({"min_tokens": 17}, "min_tokens", "min_tokens: must be at most max_tokens=16, got 17"),
    ({"logprobs": -1}, "logprobs", "logprobs: must be in [0, 20], got -1"),
    ({"logprobs": 21}, "logprobs", "logprobs: must be in [0, 20], got 21"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "prompt_logprobs: must be in [0, 20], got -1"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "prompt_logprobs: must be in [0, 20], got 21"),
    ({"seed": -1}, "seed", "seed: must be in [0, 2**64 - 1], got -1"),
    ({"seed": 2**64}, "seed", f"seed: must be in [0, 2**64 - 1], got {2**64}"),
    ({"stop": ("end", "")}, "stop", "stop: must not contain an empty string"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids", "stop_token_ids: must be non-negative, got [3, -1]"),
]


@pytest.mark.parametrize(("kwargs", "field", "message"), BAD_VALUES, ids=[m for _, _, m in BAD_VALUES])
def test_out_of_range_value_raises_error_naming_field(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 256, "temperature": 0.0, "top_p": 1.0, "top_k": -1},
        {"top_k": 0, "min_p": 1.0, "presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 1e-3, "seed": 2**64 - 1, "logprobs": 20, "prompt_logprobs": 0},
        {"min_tokens": 16, "max_tokens": 16, "stop": ("a",), "stop_token_ids": (0,)},
        {"max_tokens": None, "min_tokens": 1000},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    params = SamplingParams(**kwargs)
    params.validate(VOCAB_SIZE, 2000, 10)
    assert all(getattr(params, name) == value for name, value in kwargs.items())


def test_stop_token_id_outside_vocabulary_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(stop_token_ids=(5, VOCAB_SIZE)).validate(VOCAB_SIZE, MAX_MODEL_LEN, 10)
    assert info.value.field == "stop_token_ids"
    assert str(info.value) == "stop_token_ids: token id 100 is outside the vocabulary [0, 100)"


def test_prompt_plus_max_tokens_beyond_context_is_rejected_with_both_counts() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(max_tokens=20).validate(VOCAB_SIZE, MAX_MODEL_LEN, 45)
    assert info.value.field == "max_tokens"
    assert str(info.value) == (
        "max_tokens: This model's maximum context length is 64 tokens. However, you requested 65 tokens "
        "(45 in the messages, 20 in the completion). Please reduce the length of the messages or completion."
    )


def _rejected_fields(check: Callable[[int], None], values: range) -> dict[int, str]:
    rejected: dict[int, str] = {}
    for value in values:
        try:
            check(value)
        except InvalidArgumentError as exc:
            rejected[value] = exc.field
    return rejected


def test_max_tokens_may_fill_the_context_exactly() -> None:
    rejected = _rejected_fields(
        lambda max_tokens: SamplingParams(max_tokens=max_tokens).validate(VOCAB_SIZE, MAX_MODEL_LEN, 45),
        range(15, 24),
    )
    assert rejected == {20: "max_tokens", 21: "max_tokens", 22: "max_tokens", 23: "max_tokens"}


def test_unbounded_max_tokens_needs_room_for_one_token() -> None:
    rejected = _rejected_fields(
        lambda num_prompt: SamplingParams(max_tokens=None).validate(VOCAB_SIZE, MAX_MODEL_LEN, num_prompt),
        range(60, 66),
    )
    assert rejected == {64: "max_tokens", 65: "max_tokens"}
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(max_tokens=None).validate(VOCAB_SIZE, MAX_MODEL_LEN, 64)
    assert str(info.value) == (
        "max_tokens: This model's maximum context length is 64 tokens, and the prompt has 64 tokens, "
        "which leaves no room for the completion. Please reduce the length of the prompt."
    )


def test_unbounded_max_tokens_rejects_min_tokens_beyond_context() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(max_tokens=None, min_tokens=20).validate(VOCAB_SIZE, MAX_MODEL_LEN, 45)
    assert info.value.field == "min_tokens"
    assert str(info.value) == (
        "min_tokens: must leave room for the prompt: at most 19 with a prompt of 45 tokens, got 20"
    )


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_prompt((), VOCAB_SIZE, MAX_MODEL_LEN)
    assert (info.value.field, str(info.value)) == ("prompt", "prompt: must not be empty")


@pytest.mark.parametrize("token_id", [-1, VOCAB_SIZE])
def test_prompt_token_outside_vocabulary_is_rejected(token_id: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_prompt((1, token_id, 2), VOCAB_SIZE, MAX_MODEL_LEN)
    assert info.value.field == "prompt"
    assert str(info.value) == f"prompt: token id {token_id} is outside the vocabulary [0, 100)"


def test_the_first_prompt_token_outside_the_vocabulary_is_the_one_named() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_prompt((5, VOCAB_SIZE + 7, -3, VOCAB_SIZE), VOCAB_SIZE, MAX_MODEL_LEN)
    assert str(info.value) == f"prompt: token id {VOCAB_SIZE + 7} is outside the vocabulary [0, 100)"


def test_prompt_longer_than_context_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_prompt((1,) * 65, VOCAB_SIZE, MAX_MODEL_LEN)
    assert info.value.field == "prompt"
    assert str(info.value) == "prompt: the prompt (length 65) is longer than the maximum model length of 64"


def test_prompt_may_fill_the_context_exactly() -> None:
    rejected = _rejected_fields(
        lambda length: validate_prompt((0,) * (length - 1) + (99,), VOCAB_SIZE, MAX_MODEL_LEN), range(62, 67)
    )
    assert rejected == {65: "prompt", 66: "prompt"}


def test_greedy_means_zero_temperature() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


def test_a_string_alone_is_one_stop_string_or_bad_word_and_lists_become_tuples() -> None:
    ids = [5, 6]
    params = SamplingParams(stop="###", bad_words="bad", stop_token_ids=ids, allowed_token_ids=ids)  # type: ignore[arg-type]
    ids.append(-1)  # changing the caller's list afterwards changes nothing checked

    assert (params.stop, params.bad_words) == (("###",), ("bad",))  # vLLM's stop="###", not three stops at "#"
    assert params.stop_token_ids == params.allowed_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
