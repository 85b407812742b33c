"""Protobuf <-> domain types of the public GenerationService's requests (the rest travel as the relay encodes them)."""

from __future__ import annotations

from pagedserve.control_plane.errors import InvalidArgumentError
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import generation_service_pb2


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
