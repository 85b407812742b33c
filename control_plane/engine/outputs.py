"""What a request's stream carries out of the engine: its chunks, its usage, and the failure that may end it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.control_plane.errors import PagedServeError
from pagedserve.control_plane.text.completion import CompletionChunk


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


class StreamItem(NamedTuple):
    """One chunk of a request's stream; usage is set on the request's very last chunk."""

    chunk: CompletionChunk
    usage: Usage | None = None


class RequestFailed(NamedTuple):
    """The end of a request's stream when the engine cannot finish it: WorkerUnavailableError when its worker
    failed or hung or the engine admits nothing, InvalidArgumentError when its worker cannot honour one of its sampling
    parameters (a constraint it cannot compile), a plain PagedServeError (INTERNAL) when the engine itself failed."""

    request_id: str
    error: PagedServeError


EngineOutput = StreamItem | RequestFailed
