"""GenerationService.Chat in-process on a loopback port over a fake engine: the engine gets the ids transformers'
apply_chat_template gives, and every refusal has its status code, names its field and reaches no engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.control_plane.frontend.convert import MAX_CHAT_MESSAGES, MAX_CHAT_TOOLS
from pagedserve.control_plane.frontend.engine_client import EngineClient
from pagedserve.control_plane.frontend.service import GenerationServicer, build_server
from pagedserve.control_plane.served_model import ServedModel
from pagedserve.control_plane.text.chat_template import ChatTemplate
from pagedserve.control_plane.text.tokenizer import Tokenizer
from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.chat_model import ROLES_CHAT_TEMPLATE, with_chat_template

pb = generation_service_pb2
_MODEL = ServedModel(name="stories260K", architecture="LlamaForCausalLM", dtype="float32", vocab_size=512,
                     max_model_len=512, block_size=16, num_gpu_blocks=64, num_workers=1, eos_token_ids=(2,))
USER = pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Tell me a story.")
WEATHER = pb.ChatTool(name="get_weather", description="The weather in a city",
                      parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')


class _FakeEngine:
    """The engine process as the servicer sees it: records what is added, answers each request with one token."""

    def __init__(self) -> None:
        self.added: list[tuple[tuple[int, ...], common_pb2.SamplingParams, str, int]] = []
        self.arrivals: list[tuple[float | None, float]] = []  # (the frontend's arrival time, when added)

    def add_request(self, prompt_token_ids: tuple[int, ...], sampling_params: common_pb2.SamplingParams,
                    request_id: str = "", priority: int = 0, arrival_time_s: float | None = None) -> str:
        self.added.append((tuple(prompt_token_ids), sampling_params, request_id, priority))
        self.arrivals.append((arrival_time_s, time.monotonic()))
        return request_id or f"req-{len(self.added)}"

    async def stream(self, request_id: str) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(request_id=request_id, token_ids=[5], text=" x",
                                  finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=1, completion_tokens=1))


def _as_is(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def chat_model_dir(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(stories260k_dir, tmp_path_factory.mktemp("stories-chat"), ROLES_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_tokenizer(chat_model_dir: Path) -> Tokenizer:
    return Tokenizer(chat_model_dir)


def _chat(tokenizer: Tokenizer, request: pb.ChatRequest | bytes, template: str | None = None,
          max_num_seqs: int | None = None) -> tuple[grpc.StatusCode, str, list[pb.ChatResponse], _FakeEngine]:
    engine = _FakeEngine()

    async def main() -> tuple[grpc.StatusCode, str, list[pb.ChatResponse]]:
        servicer = GenerationServicer(cast(EngineClient, engine), tokenizer, _MODEL, max_num_seqs,
                                      ChatTemplate(tokenizer, template))
        server, port = await build_server(servicer, "127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                if isinstance(request, bytes):
                    call: Any = channel.unary_stream(
                        "/pagedserve.v1.GenerationService/Chat", request_serializer=_as_is,
                        response_deserializer=pb.ChatResponse.FromString,
                    )(request, timeout=10)
                else:
                    call = generation_service_pb2_grpc.GenerationServiceStub(channel).Chat(request, timeout=10)
                responses = []
                try:
                    async for response in call:
                        responses.append(response)
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details() or "", responses
                return grpc.StatusCode.OK, "", responses
        finally:
            await server.stop(grace=None)

    code, details, responses = asyncio.run(main())
    return code, details, responses, engine


def test_a_chat_reaches_the_engine_as_the_ids_transformers_renders_and_streams_generates_chunks(
    chat_model_dir: Path, chat_tokenizer: Tokenizer,
) -> None:
    params = common_pb2.SamplingParams(max_tokens=7, temperature=0.0)
    request = pb.ChatRequest(request_id="chat-1", messages=[USER], sampling_params=params, priority=3, tools=[WEATHER])
    code, _, responses, engine = _chat(chat_tokenizer, request)
    assert code == grpc.StatusCode.OK
    hf = PreTrainedTokenizerFast.from_pretrained(str(chat_model_dir), local_files_only=True)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": json.loads(WEATHER.parameters_json)}}
    reference = hf.apply_chat_template([{"role": "user", "content": "Tell me a story."}], tools=[tool],
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert engine.added == [(tuple(reference), params, "chat-1", 3)]
    [(arrival, added)] = engine.arrivals  # stamped when the chat arrived, before its template was rendered
    assert arrival is not None and arrival <= added
    assert [r.chunk.token_ids for r in responses] == [[5]]
    assert responses[0].chunk.request_id == "chat-1"


def test_the_operators_template_serves_a_model_that_has_none(stories260k_dir: Path) -> None:
    code, _, _, engine = _chat(Tokenizer(stories260k_dir), pb.ChatRequest(messages=[USER]), ROLES_CHAT_TEMPLATE)
    assert code == grpc.StatusCode.OK
    assert Tokenizer(stories260k_dir).decode(engine.added[0][0], skip_special_tokens=False) == (
        "<s> user: Tell me a story.\nassistant:"  # the space: Llama's prefix space, which transformers adds too
    )


def test_a_model_without_a_template_is_a_failed_precondition(stories260k_dir: Path) -> None:
    code, details, _, engine = _chat(Tokenizer(stories260k_dir), pb.ChatRequest(messages=[USER]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "this model has no chat template" in details and "--chat-template" in details
    assert engine.added == []


def _messages(*roles: int) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=cast(pb.ChatRole, role), content="hi") for role in roles]


@pytest.mark.parametrize(("request_", "expected"), [
    (pb.ChatRequest(), "messages: must hold at least one message"),
    (pb.ChatRequest(messages=_messages(pb.CHAT_ROLE_USER, 9)),
     "messages[1].role: unknown role 9 (system, user, assistant or tool)"),
    (pb.ChatRequest(messages=_messages(pb.CHAT_ROLE_UNSPECIFIED)), "messages[0].role: must be set"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, tool_calls=[pb.ChatToolCall(name="f")])]),
     "messages[0].tool_calls: only an assistant message calls tools"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, tool_call_id="c1")]),
     "messages[0].tool_call_id: only a tool message answers a tool call"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[
        pb.ChatToolCall(name="f", arguments_json="{'city': 1}")])]),
     "messages[0].tool_calls[0].arguments_json: is not valid JSON"),
    (pb.ChatRequest(messages=[USER], tools=[pb.ChatTool(name="f", parameters_json="[1, 2]")]),
     "tools[0].parameters_json: must be a JSON object, got a JSON list"),
    (pb.ChatRequest(messages=[USER], tools=[pb.ChatTool(description="nameless")]), "tools[0].name: must not be empty"),
    (pb.ChatRequest(messages=[USER], chat_template_kwargs_json='{"tokenize": true}'),
     "chat_template_kwargs: may not set tokenize"),
    (pb.ChatRequest(messages=[USER], continue_final_message=True, add_generation_prompt=True),
     "continue_final_message: cannot be combined with add_generation_prompt"),
    (pb.ChatRequest(messages=_messages(*[pb.CHAT_ROLE_USER] * (MAX_CHAT_MESSAGES + 1))),
     f"messages: must be at most {MAX_CHAT_MESSAGES} messages, got {MAX_CHAT_MESSAGES + 1}"),
    (pb.ChatRequest(messages=[USER], tools=[WEATHER] * (MAX_CHAT_TOOLS + 1)),
     f"tools: must be at most {MAX_CHAT_TOOLS} tools"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="a" * 4000)]),
     "messages: text of 4000 characters cannot fit the maximum model length of 512 tokens"),
    (pb.ChatRequest(messages=[USER], sampling_params=common_pb2.SamplingParams(n=5)),
     "n: must be at most max_num_seqs=4"),
    (pb.ChatRequest(request_id="a\nb", messages=[USER]), "request_id: must be printable"),
])
def test_a_malformed_chat_is_an_invalid_argument_naming_the_field_and_reaches_no_engine(
    chat_tokenizer: Tokenizer, request_: pb.ChatRequest, expected: str,
) -> None:
    code, details, _, engine = _chat(chat_tokenizer, request_, max_num_seqs=4)
    assert (code, details[:len(expected)]) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    assert engine.added == []


def test_a_template_that_raises_is_an_invalid_argument_with_the_templates_message(chat_tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}" \
               "{% endif %}{{ m['content'] }}{% endfor %}"
    request = pb.ChatRequest(messages=[USER, pb.ChatMessage(role=pb.CHAT_ROLE_TOOL, content="42")])
    code, details, _, engine = _chat(chat_tokenizer, request, template)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "messages: the chat template failed: TemplateError: no tools here")
    assert engine.added == []


def test_a_rendered_prompt_longer_than_the_model_is_refused_before_the_engine(chat_tokenizer: Tokenizer) -> None:
    template = "{% for i in range(2000) %}{{ messages[0]['content'] }}{% endfor %}"
    code, details, _, engine = _chat(chat_tokenizer, pb.ChatRequest(messages=[USER]), template)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("messages: text of 32000 characters cannot fit the maximum model length")
    assert engine.added == []


def test_an_unknown_field_in_a_chat_message_is_refused_not_ignored(chat_tokenizer: Tokenizer) -> None:
    message = USER.SerializeToString() + bytes([0xA8, 0x01, 0x01])  # field 21, varint 1: unknown to this server
    data = bytes([0x12, len(message)]) + message  # ChatRequest.messages (field 2) holding it
    code, details, _, engine = _chat(chat_tokenizer, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == ("unsupported ChatRequest: unknown field number 21 in messages "
                       "(pagedserve.v1.ChatMessage), not supported by this server")
    assert engine.added == []
