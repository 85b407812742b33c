"""The one protobuf codec of the contract: sampling parameter defaults and ranges, steps and their results field for
field, and round trips of every value that crosses the planes."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.contract.codec import (
    cache_info_from_proto,
    cache_info_to_proto,
    cache_request_from_proto,
    cache_request_to_proto,
    sampling_params_from_proto,
    sampling_params_to_proto,
    step_plan_from_proto,
    step_plan_to_proto,
    step_result_from_proto,
    step_result_to_proto,
    token_ids_from_bytes,
    token_ids_to_bytes,
    token_logprobs_from_proto,
    token_logprobs_to_proto,
    worker_info_from_proto,
    worker_info_to_proto,
)
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.contract.step import (
    BlockTableUpdate,
    NewSequence,
    ScheduledSequence,
    SequenceFailure,
    SequenceOutput,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from pagedserve.contract.structured_output import ConstraintKind, StructuredOutput
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.v1 import common_pb2, generation_service_pb2, worker_service_pb2

# Values exactly representable in float32, so they survive the wire unchanged.
LOGPROBS = TokenLogprobs(token_id=7, logprob=-0.25, rank=2, top_token_ids=(3, 7), top_logprobs=(-0.125, -0.25))
FULL_PARAMS = SamplingParams(
    n=3, temperature=0.5, top_p=0.75, top_k=-1, min_p=0.125, presence_penalty=-1.5,
    frequency_penalty=0.25, repetition_penalty=1.25, seed=2**64 - 1, stop=("\n", "###"),
    stop_token_ids=(5, 9), include_stop_str_in_output=True, ignore_eos=True, min_tokens=2,
    max_tokens=40, logprobs=0, prompt_logprobs=5, skip_special_tokens=False,
)  # fmt: skip


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
    assert sampling_params_from_proto(pb) == FULL_PARAMS


def test_zero_that_was_set_is_not_mistaken_for_unset() -> None:
    params = sampling_params_from_proto(common_pb2.SamplingParams(temperature=0.0, logprobs=0, top_p=1.0))
    assert (params.temperature, params.logprobs) == (0.0, 0)


def test_out_of_range_proto_value_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        sampling_params_from_proto(common_pb2.SamplingParams(temperature=-1.0))
    assert info.value.field == "temperature"


@pytest.mark.parametrize(
    "params", [SamplingParams(), FULL_PARAMS, SamplingParams(temperature=0.0, seed=0, logprobs=20)]
)
def test_sampling_params_round_trip_through_the_wire(params: SamplingParams) -> None:
    wire = common_pb2.SamplingParams.FromString(sampling_params_to_proto(params).SerializeToString())
    assert sampling_params_from_proto(wire) == params


def test_unbounded_max_tokens_travels_unset() -> None:
    assert not sampling_params_to_proto(SamplingParams(max_tokens=None)).HasField("max_tokens")


def _full_plan() -> StepPlan:
    params = SamplingParams(
        temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.5, seed=11, min_tokens=2, logprobs=3, prompt_logprobs=0, allowed_token_ids=(5, 6),
        bad_words=("dark",), spaces_between_special_tokens=False, truncate_prompt_tokens=8, best_of=1,
        structured_output=StructuredOutput(ConstraintKind.CHOICE, choices=("yes", "no"), disable_any_whitespace=True),
    )  # fmt: skip
    return StepPlan(
        step_id=12,
        dropped_seq_ids=(4, 5),
        swap_out=((1, 10),),
        swap_in=((11, 2), (12, 3)),
        block_copies=((6, 7),),
        new_sequences=(
            NewSequence(
                seq_id=8, prompt_token_ids=(1, 50, 60), output_token_ids=(70,), sampling_params=params,
                block_ids=(20, 21), num_computed_tokens=2, num_scheduled_tokens=2, banned_token_ids=(2, 9),
                fork_seq_ids=(9, 10), sample_index=1,
            ),
            NewSequence(
                seq_id=30, prompt_token_ids=(1,), output_token_ids=(), sampling_params=SamplingParams(),
                block_ids=(22,), num_computed_tokens=0, num_scheduled_tokens=1,
            ),
        ),  # fmt: skip
        scheduled_sequences=(
            ScheduledSequence(seq_id=3, num_scheduled_tokens=1),
            ScheduledSequence(
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
        seq_id=8, prompt_token_ids=token_ids_to_bytes([1, 50, 60]), output_token_ids=token_ids_to_bytes([70]),
        block_ids=[20, 21], num_computed_tokens=2, num_scheduled_tokens=2, fork_seq_ids=[9, 10], sample_index=1,
        sampling_params=common_pb2.SamplingParams(
            n=1, temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, presence_penalty=0.5, frequency_penalty=-0.5,
            repetition_penalty=1.5, seed=11, min_tokens=2, max_tokens=16, logprobs=3, prompt_logprobs=0,
            skip_special_tokens=True, allowed_token_ids=[5, 6], bad_words=["dark"], spaces_between_special_tokens=False,
            truncate_prompt_tokens=8, best_of=1,
            structured_output=common_pb2.StructuredOutput(
                choice=common_pb2.ChoiceConstraint(choices=["yes", "no"]), disable_any_whitespace=True,
            ),
        ),
        banned_token_ids=[2, 9],
    )  # fmt: skip
    assert list(wire.decode_seq_ids) == []  # sequence 3 is a plain decode, but not after the last other one
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
    sampling = step_plan_to_proto(_full_plan()).new_sequences[1].sampling_params
    assert [sampling.HasField(name) for name in ("seed", "logprobs", "prompt_logprobs")] == [False, False, False]
    assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty) == (1.0, 1.0, 1.0)


def test_step_plan_round_trips_through_the_wire() -> None:
    wire = worker_service_pb2.ExecuteRequest.FromString(step_plan_to_proto(_full_plan()).SerializeToString())
    assert step_plan_from_proto(wire) == _full_plan()


@given(st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=64))
def test_token_ids_round_trip_through_packed_bytes(token_ids: list[int]) -> None:
    packed = token_ids_to_bytes(token_ids)
    assert len(packed) == 4 * len(token_ids)
    assert token_ids_from_bytes(packed, "prompt_token_ids") == tuple(token_ids)


def test_token_ids_are_little_endian_int32() -> None:
    assert token_ids_to_bytes([1, 258, -1]) == bytes([1, 0, 0, 0, 2, 1, 0, 0, 255, 255, 255, 255])


def test_packed_token_ids_of_a_partial_id_are_invalid_and_name_the_field() -> None:
    request = worker_service_pb2.ExecuteRequest(step_id=1)
    request.new_sequences.add(seq_id=1, prompt_token_ids=b"\x01\x00\x00\x00\x02", num_scheduled_tokens=1)
    with pytest.raises(InvalidArgumentError) as info:
        step_plan_from_proto(request)
    assert info.value.field == "new_sequences.prompt_token_ids"
    assert "5 bytes" in str(info.value)


def test_the_plain_decodes_after_the_last_other_sequence_travel_packed_and_read_back_in_order() -> None:
    chunk = ScheduledSequence(6, 16, (BlockTableUpdate(0, (40,)),))
    plan = StepPlan(step_id=3, scheduled_sequences=(ScheduledSequence(5, 1), chunk, *(
        ScheduledSequence(seq_id, 1) for seq_id in (7, 2, 9))))
    wire = worker_service_pb2.ExecuteRequest.FromString(step_plan_to_proto(plan).SerializeToString())
    assert [s.seq_id for s in wire.scheduled_sequences] == [5, 6]
    assert list(wire.decode_seq_ids) == [7, 2, 9]
    assert step_plan_from_proto(wire) == plan


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=12))
def test_any_order_of_scheduled_sequences_reads_back_as_it_was_sent(shapes: list[tuple[int, bool]]) -> None:
    """Tensor-parallel ranks re-encode the leader's plan: it must read back in the same order."""
    plan = StepPlan(step_id=1, scheduled_sequences=tuple(
        ScheduledSequence(seq_id, num_tokens, (BlockTableUpdate(0, (seq_id,)),) if has_update else ())
        for seq_id, (num_tokens, has_update) in enumerate(shapes)))
    wire = worker_service_pb2.ExecuteRequest.FromString(step_plan_to_proto(plan).SerializeToString())
    assert step_plan_from_proto(wire) == plan


def test_a_step_of_scheduled_sequence_messages_alone_still_reads() -> None:
    wire = worker_service_pb2.ExecuteRequest(step_id=3, scheduled_sequences=[
        worker_service_pb2.ScheduledSequence(seq_id=7, num_scheduled_tokens=1)])
    assert step_plan_from_proto(wire) == StepPlan(step_id=3, scheduled_sequences=(ScheduledSequence(7, 1),))


def test_execute_request_with_out_of_range_sampling_params_raises_invalid_argument() -> None:
    pb = step_plan_to_proto(_full_plan())
    pb.new_sequences[1].sampling_params.top_p = 1.5
    with pytest.raises(InvalidArgumentError) as info:
        step_plan_from_proto(pb)
    assert info.value.field == "top_p"


def test_execute_response_becomes_step_result() -> None:
    pb = worker_service_pb2.ExecuteResponse(
        step_id=12,
        step_time_ms=2.5,
        forward_time_ms=1.5,
        outputs=[
            worker_service_pb2.SequenceOutput(seq_id=8, token_id=0),
            worker_service_pb2.SequenceOutput(seq_id=9),
            worker_service_pb2.SequenceOutput(
                seq_id=5, failure=worker_service_pb2.SequenceFailure(field="structured_output", message="no")),
            worker_service_pb2.SequenceOutput(
                seq_id=3,
                token_id=7,
                logprobs=token_logprobs_to_proto(LOGPROBS),
                prompt_logprobs=[token_logprobs_to_proto(LOGPROBS), common_pb2.TokenLogprobs(token_id=1, rank=1)],
            ),
        ],
    )
    output = step_result_from_proto(worker_service_pb2.ExecuteResponse.FromString(pb.SerializeToString()))
    assert output == StepResult(
        step_id=12,
        step_time_ms=2.5,
        forward_time_ms=1.5,
        outputs=(
            SequenceOutput(seq_id=8, token_id=0),
            SequenceOutput(seq_id=9, token_id=None),
            SequenceOutput(seq_id=5, token_id=None, failure=SequenceFailure("structured_output", "no")),
            SequenceOutput(
                seq_id=3,
                token_id=7,
                logprobs=LOGPROBS,
                prompt_logprobs=(LOGPROBS, TokenLogprobs(token_id=1, logprob=0.0, rank=1)),
            ),
        ),
    )
    assert sorted(output.by_seq_id) == [3, 5, 8, 9]


def test_step_result_round_trips_through_the_wire() -> None:
    result = StepResult(
        step_id=4,
        outputs=(
            SequenceOutput(1, 0, LOGPROBS, (LOGPROBS,)),
            SequenceOutput(2, None, None, (TokenLogprobs(5, -0.5, 1),)),
            SequenceOutput(3, 999),
            SequenceOutput(4, None, failure=SequenceFailure("structured_output", "cannot be compiled: bad")),
        ),
        step_time_ms=3.5,
        forward_time_ms=2.25,
        idle_time_ms=0.125,
    )
    wire = worker_service_pb2.ExecuteResponse.FromString(step_result_to_proto(result).SerializeToString())
    back = step_result_from_proto(wire)
    assert (list(wire.token_seq_ids), list(wire.token_ids)) == ([3], [999])  # a token alone: packed
    with_logprobs, prompt_only, token_alone, failed = result.outputs
    assert back == dataclasses.replace(result, outputs=(with_logprobs, prompt_only, failed, token_alone))
    assert back.by_seq_id == {output.seq_id: output for output in result.outputs}


def test_packed_token_columns_of_different_lengths_are_refused() -> None:
    wire = worker_service_pb2.ExecuteResponse(step_id=4, token_seq_ids=[1, 2], token_ids=[5])
    with pytest.raises(ValueError, match="step 4: 2 token_seq_ids but 1 token_ids"):
        step_result_from_proto(wire)


def test_token_logprobs_round_trip_through_the_wire() -> None:
    wire = common_pb2.TokenLogprobs.FromString(token_logprobs_to_proto(LOGPROBS).SerializeToString())
    assert token_logprobs_from_proto(wire) == LOGPROBS


# gpu_memory_utilization is a float32 on the wire: these values are exact in it (the default 0.9 is not).
@pytest.mark.parametrize("request_", [
    CacheRequest(block_size=16, gpu_memory_utilization=0.75),
    CacheRequest(block_size=4, gpu_memory_utilization=0.5, num_gpu_blocks_override=0, kv_cache_memory_bytes=1 << 20,
                 swap_space_bytes=1 << 30, max_num_batched_tokens=512, max_num_seqs=8, max_model_len=1024),
])  # fmt: skip
def test_cache_request_round_trips_through_the_wire(request_: CacheRequest) -> None:
    wire = worker_service_pb2.InitCacheRequest.FromString(cache_request_to_proto(request_).SerializeToString())
    assert cache_request_from_proto(wire) == request_


def test_cache_request_zeros_take_the_defaults() -> None:
    assert cache_request_from_proto(worker_service_pb2.InitCacheRequest(block_size=8)) == CacheRequest(block_size=8)


@pytest.mark.parametrize("block_size", [0, 3, 12])
def test_cache_request_with_a_block_size_not_a_power_of_two_is_invalid(block_size: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        cache_request_from_proto(worker_service_pb2.InitCacheRequest(block_size=block_size))
    assert info.value.field == "block_size"
    assert str(info.value) == f"block_size: must be a power of two, got {block_size}"


def test_cache_info_round_trips_through_the_wire() -> None:
    info = CacheInfo(num_gpu_blocks=1234, num_cpu_blocks=56, peak_activation_bytes=7 << 30)
    wire = worker_service_pb2.InitCacheResponse.FromString(cache_info_to_proto(info).SerializeToString())
    assert cache_info_from_proto(wire) == info


def test_worker_info_round_trips_through_the_wire() -> None:
    info = WorkerInfo(
        worker_id="w0", model="stories260K", architecture="LlamaForCausalLM", dtype="bfloat16", device="cuda:0",
        vocab_size=512, max_position_embeddings=2048, weight_bytes=1 << 20, kv_bytes_per_token=4096,
        total_memory_bytes=80 << 30, is_cache_initialized=True,
    )  # fmt: skip
    wire = worker_service_pb2.GetWorkerInfoResponse.FromString(worker_info_to_proto(info).SerializeToString())
    assert worker_info_from_proto(wire) == info
