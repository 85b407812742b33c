"""Chat templates: the prompt ids equal transformers' apply_chat_template (the reference), the model's template or
the operator's, one BOS as the template writes it, tools and kwargs reach the template, and every refusal names why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.control_plane.errors import FailedPreconditionError, InvalidArgumentError
from pagedserve.control_plane.text.chat_template import ChatTemplate, Conversation, load_chat_template
from pagedserve.control_plane.text.tokenizer import Tokenizer
from tests.chat_model import LLAMA2_CHAT_TEMPLATE, ROLES_CHAT_TEMPLATE, with_chat_template

CONVERSATION = (
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
    {"role": "assistant", "content": "Once upon a time there was a cat."},
    {"role": "user", "content": "And then?"},
)
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 64}}},
}}


@pytest.fixture(scope="module")
def llama2_chat_dir(llama2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(llama2_tokenizer_dir, tmp_path_factory.mktemp("llama2-chat"), LLAMA2_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir)


def _reference_ids(model_dir: Path, messages: Any, **options: Any) -> list[int]:
    hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    return list(hf.apply_chat_template(list(messages), tokenize=True, return_dict=True, **options)["input_ids"])


def test_the_models_template_gives_the_ids_transformers_gives_with_one_bos_per_user_turn(
    llama2_chat_dir: Path,
) -> None:
    tokenizer = Tokenizer(llama2_chat_dir)
    ids = ChatTemplate(tokenizer).prompt_token_ids(Conversation(CONVERSATION, add_generation_prompt=False))
    assert ids == _reference_ids(llama2_chat_dir, CONVERSATION)
    assert ids[:2] == [1, 518]  # "<s>[": the template's BOS, and no second one from the tokenizer
    assert ids.count(1) == 2  # one per user turn, as Llama 2 chat writes it


def test_a_template_without_bos_gives_a_prompt_without_bos_as_transformers_does(stories260k_dir: Path,
                                                                                  stories: Tokenizer) -> None:
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    ids = ChatTemplate(stories, template).prompt_token_ids(Conversation(CONVERSATION))
    assert ids == _reference_ids(stories260k_dir, CONVERSATION, chat_template=template, add_generation_prompt=True)
    assert stories.bos_token_id not in ids


def test_the_operators_template_replaces_the_models(llama2_chat_dir: Path) -> None:
    tokenizer = Tokenizer(llama2_chat_dir)
    text = ChatTemplate(tokenizer, ROLES_CHAT_TEMPLATE).render(Conversation(CONVERSATION))
    assert text == ("<s>system: You tell short stories.\nuser: Tell me about a cat.\n"
                    "assistant: Once upon a time there was a cat.\nuser: And then?\nassistant:")


def test_tools_and_tool_calls_reach_the_template_as_transformers_passes_them(stories260k_dir: Path,
                                                                              stories: Tokenizer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = (
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    )
    conversation = Conversation(messages, tools=(WEATHER_TOOL,))
    text = ChatTemplate(stories, ROLES_CHAT_TEMPLATE).render(conversation)
    assert '"maxLength": 64' in text and '"arguments": {"city": "Oslo"}' in text
    assert ChatTemplate(stories, ROLES_CHAT_TEMPLATE).prompt_token_ids(conversation) == _reference_ids(
        stories260k_dir, messages, chat_template=ROLES_CHAT_TEMPLATE, tools=[WEATHER_TOOL], add_generation_prompt=True)


def test_template_kwargs_reach_the_template(stories: Tokenizer) -> None:
    conversation = Conversation(CONVERSATION[1:2], template_kwargs={"greeting": "Hello there"})
    assert ChatTemplate(stories, ROLES_CHAT_TEMPLATE).render(conversation) == (
        "<s>Hello there\nuser: Tell me about a cat.\nassistant:"
    )


def test_continue_final_message_leaves_the_last_message_open(stories: Tokenizer) -> None:
    messages = (*CONVERSATION[1:2], {"role": "assistant", "content": "Once upon"})
    text = ChatTemplate(stories, ROLES_CHAT_TEMPLATE).render(
        Conversation(messages, add_generation_prompt=False, continue_final_message=True))
    assert text == "<s>user: Tell me about a cat.\nassistant: Once upon"


def test_a_model_without_a_template_is_a_failed_precondition_that_names_the_flag(stories: Tokenizer) -> None:
    template = ChatTemplate(stories)
    assert not template.is_available
    with pytest.raises(FailedPreconditionError, match="no chat template.*--chat-template"):
        template.render(Conversation(CONVERSATION))


def test_a_template_that_raises_is_an_invalid_argument_with_its_message(llama2_chat_dir: Path) -> None:
    out_of_order = ({"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    with pytest.raises(InvalidArgumentError, match="messages: the chat template failed: TemplateError: "
                                                   "Conversation roles must alternate"):
        ChatTemplate(Tokenizer(llama2_chat_dir)).render(Conversation(out_of_order))


def test_a_template_error_message_is_cut_to_a_bounded_length(stories: Tokenizer) -> None:
    template = "{{ raise_exception(messages[0]['content']) }}"
    with pytest.raises(InvalidArgumentError) as error:
        ChatTemplate(stories, template).render(Conversation(({"role": "user", "content": "x" * 100_000},)))
    assert len(str(error.value)) < 600


@pytest.mark.parametrize(("options", "message"), [
    ({"messages": ()}, "messages: must hold at least one message"),
    ({"messages": CONVERSATION, "continue_final_message": True},
     "continue_final_message: cannot be combined with add_generation_prompt"),
    ({"messages": CONVERSATION, "template_kwargs": {"tokenize": True, "messages": []}},
     "chat_template_kwargs: may not set messages, tokenize"),
])
def test_a_conversation_refuses_what_would_change_how_it_renders(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Conversation(**options)


def test_template_kwargs_may_not_replace_the_special_tokens(stories: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="chat_template_kwargs: may not set bos_token"):
        ChatTemplate(stories, ROLES_CHAT_TEMPLATE).render(Conversation(CONVERSATION, template_kwargs={"bos_token": ""}))


def test_the_flag_takes_a_file_or_the_template_text(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(ROLES_CHAT_TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == ROLES_CHAT_TEMPLATE
    assert load_chat_template(ROLES_CHAT_TEMPLATE) == ROLES_CHAT_TEMPLATE


@pytest.mark.parametrize(("value", "message"), [
    ("templates/chat.jinja", "looks like a path, but cannot be read"),
    ("{% for m in messages %}", "does not compile: TemplateSyntaxError"),
])
def test_the_flag_refuses_a_missing_file_or_a_template_that_does_not_compile(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_chat_template(value)
