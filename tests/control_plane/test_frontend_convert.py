"""Protobuf <-> domain types of the public GenerationService's requests: the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.frontend.convert import prompt_from_proto
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import generation_service_pb2


@pytest.fixture(scope="module")
def tokenizer(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir)


def test_text_prompt_is_tokenized_with_bos(tokenizer: Tokenizer) -> None:
    request = generation_service_pb2.GenerateRequest(text="Once upon a time")
    assert prompt_from_proto(request, tokenizer) == tuple(tokenizer.encode("Once upon a time"))
    assert prompt_from_proto(request, tokenizer)[0] == 1


def test_token_id_prompt_is_taken_as_given(tokenizer: Tokenizer) -> None:
    request = generation_service_pb2.GenerateRequest(token_ids=generation_service_pb2.TokenIds(ids=[5, 6, 7]))
    assert prompt_from_proto(request, tokenizer) == (5, 6, 7)


def test_request_without_prompt_is_invalid(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        prompt_from_proto(generation_service_pb2.GenerateRequest(request_id="r"), tokenizer)
    assert str(info.value) == "prompt: must be set, as text or token_ids"


def test_empty_text_prompt_is_invalid(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        prompt_from_proto(generation_service_pb2.GenerateRequest(text=""), tokenizer)
    assert str(info.value) == "prompt: must not be empty"
