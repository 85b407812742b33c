"""The real gateway (`smg launch --backend vllm`) in front of one pagedserve server, through the real `openai` SDK:
/v1/completions and /v1/chat/completions give pagedserve's own greedy tokens, stops, n, logprobs and usage; a
client that leaves frees its blocks; a bad parameter is an HTTP 400."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
import transformers
from openai.types.chat import ChatCompletionMessageParam

from benchmarks.gateway_process import running_gateway
from pagedserve.v1 import common_pb2, generation_service_pb2_grpc
from pagedserve.v1 import generation_service_pb2 as pb
from tests.e2e.gateway import model_with_chat_template
from tests.e2e.processes import Cluster, running_cluster

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, there was a little girl named Lily. She"
CONTENT = "Tell me a story about a cat."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": CONTENT}]


@pytest.fixture(scope="module")
def model_dir(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_with_chat_template(stories260k_dir, tmp_path_factory.mktemp("chat-model") / "stories260K")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(model_dir, tmp_path_factory.mktemp("gateway-logs")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(server: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log_path = tmp_path_factory.mktemp("smg") / "smg.log"
    with running_gateway([f"grpc://{server.address}"], log_path) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ours(server: Cluster) -> Iterator[generation_service_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield generation_service_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _greedy_ids(ours: generation_service_pb2_grpc.GenerationServiceStub, prompt_ids: list[int],
                max_tokens: int) -> list[int]:
    """pagedserve's own Generate on the prompt ids the gateway sends (it tokenizes without adding BOS)."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling_params=common_pb2.SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [t for r in ours.Generate(request) for t in r.token_ids]


def _decode(tokenizer: transformers.PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The text the gateway makes of these output tokens, by the transformers tokenizer."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert isinstance(text, str)
    return text


def test_completions_are_pagedserves_greedy_tokens_streamed_or_not(
    client: openai.OpenAI, ours: generation_service_pb2_grpc.GenerationServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = _decode(tokenizer, _greedy_ids(ours, prompt_ids, 16))
    model = client.models.list().data[0].id
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        len(prompt_ids), 16)
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_chat_completions_are_pagedserves_tokens_on_the_templated_prompt(
    client: openai.OpenAI, ours: generation_service_pb2_grpc.GenerationServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    templated = tokenizer.apply_chat_template([{"role": "user", "content": CONTENT}], add_generation_prompt=True,
                                              tokenize=False)
    prompt_ids = tokenizer.encode(templated, add_special_tokens=False)
    expected = _decode(tokenizer, _greedy_ids(ours, prompt_ids, 12))
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(prompt_ids), 12)
    assert reply.choices[0].message.content == expected
    streamed = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_stop_n_logprobs_and_usage(
    client: openai.OpenAI, ours: generation_service_pb2_grpc.GenerationServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    model = client.models.list().data[0].id
    greedy = _decode(tokenizer, _greedy_ids(ours, tokenizer.encode(PROMPT, add_special_tokens=False), 16))
    stop = greedy.split()[3]
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == greedy[:greedy.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    several = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                             temperature=1.0, n=3, seed=3, logprobs=True, top_logprobs=2,
                                             extra_body={"ignore_eos": True})
    assert sorted(choice.index for choice in several.choices) == [0, 1, 2]
    assert several.usage is not None and several.usage.completion_tokens == 15
    for choice in several.choices:
        assert choice.logprobs is not None and len(choice.logprobs.content or []) == 5
        for entry in choice.logprobs.content or []:
            assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.logprob <= 0.0


def test_invalid_parameter_is_http_400(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, top_p=3.0)


def test_client_that_disconnects_aborts_its_request_and_frees_its_blocks(
    client: openai.OpenAI, ours: generation_service_pb2_grpc.GenerationServiceStub,
) -> None:
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert ours.GetServerStatus(pb.GetServerStatusRequest()).num_requests_running == 1
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = ours.GetServerStatus(pb.GetServerStatusRequest())
        if status.num_requests_running == 0 and status.num_used_blocks == 0:
            break
        time.sleep(0.05)
    assert (status.num_requests_running, status.num_used_blocks) == (0, 0)
    assert status.generation_tokens < 400 + 200  # it did not run to its end


def test_our_chat_rpc_gives_the_gateways_chat_completion(
    client: openai.OpenAI, ours: generation_service_pb2_grpc.GenerationServiceStub,
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    conversation: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Tell a story."}, {"role": "user", "content": CONTENT}]
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="Tell a story."),
                  pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=CONTENT)],
        sampling_params=common_pb2.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    chunks = [response.chunk for response in ours.Chat(request, timeout=60)]
    ids = [t for chunk in chunks for t in chunk.token_ids]
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=conversation,
                                           max_tokens=12, temperature=0, logprobs=True,
                                           extra_body={"ignore_eos": True})
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (chunks[-1].usage.prompt_tokens, 12)
    assert reply.choices[0].message.content == _decode(tokenizer, ids)
    # The gateway decodes the completion alone, where the SentencePiece decoder drops the first piece's space; our
    # server decodes it after the prompt, as vLLM does, and keeps it.
    assert "".join(chunk.text for chunk in chunks).lstrip(" ") == reply.choices[0].message.content
    assert reply.choices[0].logprobs is not None
    assert [entry.token for entry in reply.choices[0].logprobs.content or []] == [
        tokenizer.decode([token_id]) for token_id in ids]


def test_response_format_json_schema_holds_the_reply_to_the_schema(client: openai.OpenAI) -> None:
    # A string at the top: inside an object a model this small would spend max_tokens on the whitespace JSON allows.
    schema: dict[str, object] = {"type": "string", "enum": ["happy", "sad"]}
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=64, seed=5, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_an_uncompilable_response_format_is_http_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
