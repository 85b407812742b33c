"""Protobuf <-> domain conversion of the control plane: defaults, exact fields and round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.control_plane.text.completion import CompletionChunk
from pagedserve.control_plane.convert import (
    add_generate_response,
    request_error_from_proto,
    request_error_to_proto,
    prompt_from_proto,
    sampling_params_from_proto,
    step_output_from_proto,
    step_plan_to_proto,
    token_logprobs_from_proto,
    token_logprobs_to_proto,
)
from pagedserve.control_plane.engine.engine import Usage
from pagedserve.control_plane.errors import (
    InvalidArgumentError,
    NotFoundError,
    PagedServeError,
    ResourceExhaustedError,
    WorkerUnavailableError,
)
from pagedserve.control_plane.scheduling.request import FinishReason
from pagedserve.control_plane.sampling_params import SamplingParams
from pagedserve.control_plane.step_plan import (
    BlockTableUpdate,
    NewSequencePlan,
    ScheduledSequencePlan,
    SequenceOutput,
    StepOutput,
    StepPlan,
    TokenLogprobs,
    WorkerSampling,
)
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, engine_service_pb2, generation_service_pb2, worker_service_pb2

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

# Values exactly representable in float32, so they survive the wire unchanged.
LOGPROBS = TokenLogprobs(token_id=7, logprob=-0.25, rank=2, top_token_ids=(3, 7), top_logprobs=(-0.125, -0.25))


def test_a_request_without_sampling_params_takes_all_defaults() -> None:
    request = generation_service_pb2.GenerateRequest(text="hi")
    assert not request.HasField("sampling_params")
    assert sampling_params_from_proto(request.sampling_params) == SamplingParams()


def test_unset_fields_take_vllm_defaults() -> None:
    params = sampling_params_from_proto(common_pb2.SamplingParams())
    assert params == SamplingParams()
    assert (params.max_tokens, params.skip_special_tokens, params.seed, params.logprobs) == (16, True, None, None)


def test_every_set_field_is_carried_over() -> None:
    pb = common_pb2.SamplingParams(
        n=3, temperature=0.5, top_p=0.75, top_k=-1, min_p=0.125, presence_penalty=-1.5,
        frequency_penalty=0.25, repetition_penalty=1.25, seed=2**64 - 1, stop=["\n", "###"],
        stop_token_ids=[5, 9], include_stop_str_in_output=True, ignore_eos=True, min_tokens=2,
        max_tokens=40, logprobs=0, prompt_logprobs=5, skip_special_tokens=False,
    )  # fmt: skip
    assert sampling_params_from_proto(pb) == SamplingParams(
        n=3, temperature=0.5, top_p=0.75, top_k=-1, min_p=0.125, presence_penalty=-1.5,
        frequency_penalty=0.25, repetition_penalty=1.25, seed=2**64 - 1, stop=("\n", "###"),
        stop_token_ids=(5, 9), include_stop_str_in_output=True, ignore_eos=True, min_tokens=2,
        max_tokens=40, logprobs=0, prompt_logprobs=5, skip_special_tokens=False,
    )  # fmt: skip


def test_zero_that_was_set_is_not_mistaken_for_unset() -> None:
    params = sampling_params_from_proto(common_pb2.SamplingParams(temperature=0.0, logprobs=0, top_p=1.0))
    assert (params.temperature, params.logprobs) == (0.0, 0)


def test_out_of_range_proto_value_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        sampling_params_from_proto(common_pb2.SamplingParams(temperature=-1.0))
    assert info.value.field == "temperature"


def _full_plan() -> StepPlan:
    sampling = WorkerSampling(
        temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.5, seed=11, min_tokens=2, banned_token_ids=(2, 9), logprobs=3, prompt_logprobs=0,
    )  # fmt: skip
    return StepPlan(
        step_id=12,
        dropped_seq_ids=(4, 5),
        swap_out=((1, 10),),
        swap_in=((11, 2), (12, 3)),
        block_copies=((6, 7),),
        new_sequences=(
            NewSequencePlan(
                seq_id=8, prompt_token_ids=(1, 50, 60), output_token_ids=(70,), sampling=sampling,
                block_ids=(20, 21), num_computed_tokens=2, num_scheduled_tokens=2, fork_seq_ids=(9, 10),
                sample_index=1,
            ),
            NewSequencePlan(
                seq_id=30, prompt_token_ids=(1,), output_token_ids=(), sampling=WorkerSampling(),
                block_ids=(22,), num_computed_tokens=0, num_scheduled_tokens=1,
            ),
        ),  # fmt: skip
        scheduled_sequences=(
            ScheduledSequencePlan(seq_id=3, num_scheduled_tokens=1),
            ScheduledSequencePlan(
                seq_id=6,
                num_scheduled_tokens=16,
                block_table_updates=(BlockTableUpdate(0, (40,)), BlockTableUpdate(5, (41, 42))),
            ),
        ),
    )


def test_step_plan_becomes_execute_request_field_for_field() -> None:
    wire = worker_service_pb2.ExecuteRequest.FromString(step_plan_to_proto(_full_plan()).SerializeToString())
    mapping = worker_service_pb2.BlockMapping
    assert wire.step_id == 12
    assert list(wire.dropped_seq_ids) == [4, 5]
    assert list(wire.swap_out) == [mapping(src_block_id=1, dst_block_id=10)]
    assert list(wire.swap_in) == [mapping(src_block_id=11, dst_block_id=2), mapping(src_block_id=12, dst_block_id=3)]
    assert list(wire.block_copies) == [mapping(src_block_id=6, dst_block_id=7)]
    assert wire.new_sequences[0] == worker_service_pb2.NewSequence(
        seq_id=8, prompt_token_ids=[1, 50, 60], output_token_ids=[70], block_ids=[20, 21],
        num_computed_tokens=2, num_scheduled_tokens=2, fork_seq_ids=[9, 10], sample_index=1,
        sampling=worker_service_pb2.SequenceSampling(
            temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, presence_penalty=0.5, frequency_penalty=-0.5,
            repetition_penalty=1.5, seed=11, min_tokens=2, banned_token_ids=[2, 9], logprobs=3,
            prompt_logprobs=0,
        ),
    )  # fmt: skip
    assert list(wire.scheduled_sequences) == [
        worker_service_pb2.ScheduledSequence(seq_id=3, num_scheduled_tokens=1),
        worker_service_pb2.ScheduledSequence(
            seq_id=6,
            num_scheduled_tokens=16,
            block_table_updates=[
                worker_service_pb2.BlockTableUpdate(start_index=0, block_ids=[40]),
                worker_service_pb2.BlockTableUpdate(start_index=5, block_ids=[41, 42]),
            ],
        ),
    ]


def test_unset_optional_sampling_fields_stay_unset_on_the_wire() -> None:
    sampling = step_plan_to_proto(_full_plan()).new_sequences[1].sampling
    assert [sampling.HasField(name) for name in ("seed", "logprobs", "prompt_logprobs")] == [False, False, False]
    assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty) == (1.0, 1.0, 1.0)


def test_execute_response_becomes_step_output() -> None:
    pb = worker_service_pb2.ExecuteResponse(
        step_id=12,
        step_time_ms=2.5,
        forward_time_ms=1.5,
        outputs=[
            worker_service_pb2.SequenceOutput(seq_id=8, token_id=0),
            worker_service_pb2.SequenceOutput(seq_id=9),
            worker_service_pb2.SequenceOutput(
                seq_id=3,
                token_id=7,
                logprobs=token_logprobs_to_proto(LOGPROBS),
                prompt_logprobs=[token_logprobs_to_proto(LOGPROBS), common_pb2.TokenLogprobs(token_id=1, rank=1)],
            ),
        ],
    )
    output = step_output_from_proto(worker_service_pb2.ExecuteResponse.FromString(pb.SerializeToString()))
    assert output == StepOutput(
        step_id=12,
        step_time_ms=2.5,
        forward_time_ms=1.5,
        outputs=(
            SequenceOutput(seq_id=8, token_id=0),
            SequenceOutput(seq_id=9, token_id=None),
            SequenceOutput(
                seq_id=3,
                token_id=7,
                logprobs=LOGPROBS,
                prompt_logprobs=(LOGPROBS, TokenLogprobs(token_id=1, logprob=0.0, rank=1)),
            ),
        ),
    )
    assert sorted(output.by_seq_id) == [3, 8, 9]


def test_token_logprobs_round_trip_through_the_wire() -> None:
    wire = common_pb2.TokenLogprobs.FromString(token_logprobs_to_proto(LOGPROBS).SerializeToString())
    assert token_logprobs_from_proto(wire) == LOGPROBS


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(SHARED / "models" / "stories260K")


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


def test_last_chunk_carries_finish_reason_and_usage() -> None:
    chunk = CompletionChunk(
        request_id="r1", index=1, token_ids=(5, 2), text=" end", logprobs=(LOGPROBS,),
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
    chunk = CompletionChunk(request_id="r", index=0, token_ids=(), text="", finish_reason=reason)
    pb = add_generate_response(engine_service_pb2.RelayResponse().responses, chunk, None)
    assert (pb.finish_reason, pb.HasField("usage")) == (wire, False)


def test_empty_text_prompt_is_invalid(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        prompt_from_proto(generation_service_pb2.GenerateRequest(text=""), tokenizer)
    assert str(info.value) == "prompt: must not be empty"


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
