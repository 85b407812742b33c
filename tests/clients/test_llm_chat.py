"""LLM.chat in vLLM's shape: one conversation or a list, the model's template or one passed in, and the tokens equal
LLM.generate's on the prompt transformers' apply_chat_template renders (the reference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.errors import FailedPreconditionError
from tests.chat_model import LLAMA2_CHAT_TEMPLATE, ROLES_CHAT_TEMPLATE, with_chat_template

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
FIRST = [{"role": "user", "content": "Once upon a time"}]
SECOND = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about a dog."}]


@pytest.fixture(scope="module")
def chat_model_dir(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_chat_template(stories260k_dir, tmp_path_factory.mktemp("stories-chat"), ROLES_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def llm(chat_model_dir: Path) -> Iterator[LLM]:
    with LLM(chat_model_dir, cache_config=CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0),
             worker_process=False) as model:
        yield model


def _reference_ids(model_dir: Path, messages: list[dict[str, Any]], **options: Any) -> list[int]:
    hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"])


def test_chat_of_a_list_of_conversations_equals_generate_on_transformers_rendering(
    llm: LLM, chat_model_dir: Path,
) -> None:
    references = [_reference_ids(chat_model_dir, m, add_generation_prompt=True) for m in (FIRST, SECOND)]
    chats = llm.chat([FIRST, SECOND], GREEDY)
    generated = llm.generate(references, GREEDY)
    assert [c.prompt_token_ids for c in chats] == [tuple(r) for r in references]
    assert [c.outputs[0].token_ids for c in chats] == [g.outputs[0].token_ids for g in generated]
    assert [c.outputs[0].text for c in chats] == [g.outputs[0].text for g in generated]


def test_chat_of_one_conversation_with_a_template_passed_in(llm: LLM, chat_model_dir: Path) -> None:
    reference = _reference_ids(chat_model_dir, SECOND[1:], chat_template=LLAMA2_CHAT_TEMPLATE)
    (chat,) = llm.chat(SECOND[1:], GREEDY, chat_template=LLAMA2_CHAT_TEMPLATE, add_generation_prompt=False)
    assert chat.prompt_token_ids == tuple(reference)
    assert chat.outputs[0].token_ids == llm.generate([reference], GREEDY)[0].outputs[0].token_ids


def test_chat_on_a_model_without_a_template_fails_with_a_clear_precondition(stories260k_dir: Path) -> None:
    with LLM(stories260k_dir, cache_config=CacheConfig(kv_cache_memory_bytes=16 << 20, swap_space_bytes=0),
             worker_process=False) as plain, pytest.raises(FailedPreconditionError, match="no chat template"):
        plain.chat(FIRST, GREEDY)
