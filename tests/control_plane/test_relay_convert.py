"""Protobuf <-> domain types of the relay between the frontend and engine processes: response chunks and errors."""

from __future__ import annotations

import pytest

from pagedserve.contract.codec import token_logprobs_to_proto
from pagedserve.contract.step import TokenLogprobs
from pagedserve.control_plane.engine.outputs import Usage
from pagedserve.control_plane.errors import (
    InvalidArgumentError,
    NotFoundError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.relay.convert import (
    add_generate_response,
    request_error_from_proto,
    request_error_to_proto,
)
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.text.completion import CompletionChunk
from pagedserve.v1 import engine_service_pb2, generation_service_pb2

# Values exactly representable in float32, so they survive the wire unchanged.
LOGPROBS = TokenLogprobs(token_id=7, logprob=-0.25, rank=2, top_token_ids=(3, 7), top_logprobs=(-0.125, -0.25))


def test_last_chunk_carries_finish_reason_and_usage() -> None:
    chunk = CompletionChunk(
        request_id="r1", completion_index=1, token_ids=(5, 2), text=" end", logprobs=(LOGPROBS,),
        finish_reason=FinishReason.STOP, stop_reason="2",
    )  # fmt: skip
    pb = add_generate_response(engine_service_pb2.RelayResponse().responses, chunk,
                               Usage(prompt_tokens=3, completion_tokens=9, cached_prompt_tokens=1))
    assert pb == generation_service_pb2.GenerateResponse(
        request_id="r1", index=1, token_ids=[5, 2], text=" end",
        logprobs=[token_logprobs_to_proto(LOGPROBS)], finish_reason=generation_service_pb2.FINISH_REASON_STOP,
        stop_reason="2",
        usage=generation_service_pb2.Usage(prompt_tokens=3, completion_tokens=9, cached_prompt_tokens=1),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "wire"),
    [
        (None, generation_service_pb2.FINISH_REASON_UNSPECIFIED),
        (FinishReason.LENGTH, generation_service_pb2.FINISH_REASON_LENGTH),
        (FinishReason.ABORT, generation_service_pb2.FINISH_REASON_ABORT),
    ],
)
def test_finish_reason_maps_to_its_wire_value(reason: FinishReason | None, wire: int) -> None:
    chunk = CompletionChunk(request_id="r", completion_index=0, token_ids=(), text="", finish_reason=reason)
    pb = add_generate_response(engine_service_pb2.RelayResponse().responses, chunk, None)
    assert (pb.finish_reason, pb.HasField("usage")) == (wire, False)


@pytest.mark.parametrize("error", [
    InvalidArgumentError("sampling_params.top_p", "must be in (0, 1], got 1.5"),
    ResourceExhaustedError("waiting queue is full (4 requests)"),
    WorkerUnavailableError("worker at 127.0.0.1:50061 failed: socket closed"),
])
def test_an_engine_error_crosses_the_relay_as_the_same_kind_with_the_same_message(error: PagedServeError) -> None:
    pb = request_error_to_proto("r@1", error)
    back = request_error_from_proto(engine_service_pb2.RequestError.FromString(pb.SerializeToString()))
    assert (pb.request_id, type(back), str(back)) == ("r@1", type(error), str(error))


def test_an_engine_error_of_no_relayed_kind_crosses_as_internal() -> None:
    pb = request_error_to_proto("r@1", NotFoundError("request_id: unknown request 'q'"))
    assert pb.kind == engine_service_pb2.REQUEST_ERROR_KIND_INTERNAL
    assert type(request_error_from_proto(pb)) is PagedServeError
