"""VllmEngine.Generate and Abort against a real stories260K server: the same tokens as GenerationService.Generate,
streamed or not, with vLLM's finish reasons, matched stops, token counts and logprobs; bad fields refused by name."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm
from smg_grpc_proto.generated import vllm_engine_pb2_grpc
from transformers import AutoTokenizer

from pagedserve.v1 import common_pb2, generation_service_pb2_grpc
from pagedserve.v1 import generation_service_pb2 as pb
from tests.e2e.processes import Cluster
from tests.vllm_engine.conftest import run_against

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, there was a little girl named Lily. She"
VllmStub = vllm_engine_pb2_grpc.VllmEngineStub
OursStub = generation_service_pb2_grpc.GenerationServiceStub


async def _ours(stub: OursStub, params: common_pb2.SamplingParams, prompt: str = PROMPT) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(pb.GenerateRequest(text=prompt, sampling_params=params))]


async def _vllm(stub: VllmStub, params: vllm.SamplingParams, stream: bool, request_id: str = "r",
                prompt: str = PROMPT) -> list[vllm.GenerateResponse]:
    request = vllm.GenerateRequest(request_id=request_id, text=prompt, sampling_params=params, stream=stream)
    return [r async for r in stub.Generate(request)]


def _tokens(responses: list[pb.GenerateResponse], index: int = 0) -> list[int]:
    return [t for r in responses if r.index == index for t in r.token_ids]


def test_greedy_tokens_equal_generation_service_streamed_and_not(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        expected = _tokens(await _ours(ours, common_pb2.SamplingParams(temperature=0, max_tokens=12)))
        streamed = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=12), stream=True)
        chunks = [r.chunk for r in streamed if r.HasField("chunk")]
        (complete,) = [r.complete for r in streamed if r.HasField("complete")]
        assert [t for c in chunks for t in c.token_ids] == expected
        assert all(c.completion_tokens == len(c.token_ids) and c.prompt_tokens == complete.prompt_tokens
                   for c in chunks)
        assert streamed[-1].HasField("complete")
        assert list(complete.output_ids) == expected
        assert (complete.finish_reason, complete.completion_tokens) == ("length", 12)
        whole = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=12), stream=False)
        assert [r.WhichOneof("response") for r in whole] == ["complete"]
        assert list(whole[0].complete.output_ids) == expected
        tokenized = (await ours.Tokenize(pb.TokenizeRequest(text=PROMPT))).token_ids
        assert whole[0].complete.prompt_tokens == len(tokenized)

    run_against(server.address, scenario)


def test_token_ids_input_and_n_completions_each_end_with_their_complete(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        prompt_ids = list((await ours.Tokenize(pb.TokenizeRequest(text=PROMPT))).token_ids)
        request = vllm.GenerateRequest(
            request_id="ids", tokenized=vllm.TokenizedInput(input_ids=prompt_ids),
            sampling_params=vllm.SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=6), stream=True,
        )
        responses = [r async for r in stub.Generate(request)]
        completes = {r.complete.index: r.complete for r in responses if r.HasField("complete")}
        assert sorted(completes) == [0, 1, 2]
        for index, complete in completes.items():
            streamed = [t for r in responses if r.HasField("chunk") and r.chunk.index == index
                        for t in r.chunk.token_ids]
            assert list(complete.output_ids) == streamed
            assert (complete.prompt_tokens, complete.completion_tokens) == (len(prompt_ids), len(streamed))

    run_against(server.address, scenario)


def test_stop_string_and_stop_token_id_are_matched_stops(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        greedy = await _ours(ours, common_pb2.SamplingParams(temperature=0, max_tokens=12))
        text = "".join(r.text for r in greedy)
        stop = text.split()[2]
        by_string = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=12, stop=[stop]), stream=False)
        assert by_string[0].complete.finish_reason == "stop"
        assert by_string[0].complete.matched_stop_str == stop
        token = _tokens(greedy)[3]
        by_id = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[token]),
                            stream=False)
        complete = by_id[0].complete
        assert (complete.finish_reason, complete.matched_token_id) == ("stop", token)
        assert list(complete.output_ids) == _tokens(greedy)[:4]

    run_against(server.address, scenario)


def test_logprobs_and_prompt_logprobs_match_generation_service(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        reference = await _ours(ours, common_pb2.SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                prompt_logprobs=2))
        output = [lp for r in reference for lp in r.logprobs]
        prompt = [lp for r in reference for lp in r.prompt_logprobs]
        (response,) = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                             prompt_logprobs=2), stream=False)
        got = response.complete.output_logprobs
        assert list(got.token_ids) == [lp.token_id for lp in output]
        assert list(got.token_logprobs) == pytest.approx([lp.logprob for lp in output])
        assert [list(top.token_ids) for top in got.top_logprobs] == [list(lp.top_token_ids) for lp in output]
        inputs = response.complete.input_logprobs
        assert not inputs.token_logprobs[0].HasField("value")  # nothing precedes the first prompt token
        assert list(inputs.token_ids[1:]) == [lp.token_id for lp in prompt]
        assert [v.value for v in inputs.token_logprobs[1:]] == pytest.approx([lp.logprob for lp in prompt])
        assert len(inputs.top_logprobs) == len(inputs.token_ids)

    run_against(server.address, scenario)


def test_a_live_request_id_sent_again_is_already_exists(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        params = vllm.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        first = stub.Generate(vllm.GenerateRequest(request_id="twice", text=PROMPT, sampling_params=params,
                                                   stream=True))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _vllm(stub, params, stream=False, request_id="twice")
        await stub.Abort(vllm.AbortRequest(request_ids=["twice"]))
        first.cancel()
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "twice" in (error.details() or "")


def test_abort_ends_the_stream_with_abort_and_frees_its_blocks(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        params = vllm.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        call = stub.Generate(vllm.GenerateRequest(request_id="long", text=PROMPT, sampling_params=params,
                                                  stream=True))
        first = await call.read()
        assert first.HasField("chunk")
        await stub.Abort(vllm.AbortRequest(request_ids=["long", "unknown-id"]))
        rest = []
        while (message := await call.read()) is not grpc.aio.EOF:
            rest.append(message)
        assert rest[-1].complete.finish_reason == "abort"
        assert rest[-1].complete.completion_tokens < 400
        for _ in range(100):
            status = await ours.GetServerStatus(pb.GetServerStatusRequest())
            if status.num_requests_running == 0 and status.num_used_blocks == 0:
                break
            await asyncio.sleep(0.05)
        assert (status.num_requests_running, status.num_used_blocks) == (0, 0)

    run_against(server.address, scenario)


def test_structured_outputs_hold_the_output_to_the_constraint(server: Cluster, stories260k_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir)

    async def scenario(stub: VllmStub, ours: OursStub) -> list[tuple[str, str]]:
        outputs = []
        for params in (vllm.SamplingParams(temperature=0, max_tokens=16, choice=vllm.ChoiceConstraint(
                           choices=["a dragon", "a castle"])),
                       vllm.SamplingParams(temperature=1.0, seed=3, max_tokens=16, regex="[0-9]{3}"),
                       vllm.SamplingParams(temperature=1.0, seed=4, max_tokens=96, json_schema=json.dumps(
                           {"type": "string", "enum": ["north", "south"]}))):
            (response,) = await _vllm(stub, params, stream=False)
            text = str(tokenizer.decode(list(response.complete.output_ids), skip_special_tokens=True))
            outputs.append((response.complete.finish_reason, text.strip()))
        return outputs

    (choice, regex, schema) = run_against(server.address, scenario)
    assert choice[0] == "stop" and choice[1] in ("a dragon", "a castle")
    assert regex[0] == "stop" and re.fullmatch("[0-9]{3}", regex[1])
    assert schema[0] == "stop"
    assert json.loads(schema[1]) in ("north", "south")


@pytest.mark.parametrize(("params", "field"), [
    (vllm.SamplingParams(regex="(a"), "structured_output.regex"),
    (vllm.SamplingParams(json_schema="{not json"), "structured_output.json_schema"),
    (vllm.SamplingParams(logprobs=-1), "sampling_params.logprobs"),
    (vllm.SamplingParams(logprobs=21), "logprobs"),
    (vllm.SamplingParams(top_p=1.5), "top_p"),
    (vllm.SamplingParams(n=9), "n"),
    (vllm.SamplingParams(max_tokens=10_000), "max_tokens"),
    (vllm.SamplingParams(stop_token_ids=[100_000]), "stop_token_ids"),
    (vllm.SamplingParams(truncate_prompt_tokens=0), "sampling_params.truncate_prompt_tokens"),
])
def test_bad_or_unsupported_sampling_field_is_invalid_argument_naming_it(
    server: Cluster, params: vllm.SamplingParams, field: str,
) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _vllm(stub, params, stream=False)
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")


@pytest.mark.parametrize("request_fields", [
    {"kv_transfer_params_json": "{}"},
    {"mm_inputs": vllm.MultimodalInputs(im_token_id=3)},
    {"data_parallel_rank": 1},
])
def test_unsupported_request_field_is_invalid_argument(server: Cluster, request_fields: dict[str, object]) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> grpc.aio.AioRpcError:
        request = vllm.GenerateRequest(request_id="x", text=PROMPT, **request_fields)  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [r async for r in stub.Generate(request)]
        return caught.value

    error = run_against(server.address, scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{next(iter(request_fields))}:")


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server: Cluster) -> None:
    async def scenario(stub: VllmStub, ours: OursStub) -> None:
        prompt_ids = list((await ours.Tokenize(pb.TokenizeRequest(text=PROMPT))).token_ids)
        expected = [r async for r in ours.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt_ids[-5:]),
            sampling_params=common_pb2.SamplingParams(temperature=0, max_tokens=5)))]
        (response,) = await _vllm(stub, vllm.SamplingParams(temperature=0, max_tokens=5, truncate_prompt_tokens=5),
                                  stream=False)
        assert response.complete.prompt_tokens == 5
        assert list(response.complete.output_ids) == _tokens(expected)

    run_against(server.address, scenario)
