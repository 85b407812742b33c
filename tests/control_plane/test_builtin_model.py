"""The built-in model directory: deterministic bytes, a Llama config matching its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pagedserve.control_plane.launch.builtin_model import BUILTIN_MODEL_NAME, write_builtin_model
from pagedserve.control_plane.text.chat_template import ChatTemplate, Conversation
from pagedserve.control_plane.text.tokenizer import Tokenizer

FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_builtin_model(tmp_path_factory.mktemp("a") / BUILTIN_MODEL_NAME)


def test_writes_exactly_the_config_and_tokenizer_files(model_dir: Path) -> None:
    assert model_dir.name == "pagedserve-tiny-llama"
    assert sorted(p.name for p in model_dir.iterdir()) == FILES


def test_two_writes_produce_identical_bytes(model_dir: Path, tmp_path: Path) -> None:
    again = write_builtin_model(tmp_path / "again")
    assert {name: (again / name).read_bytes() for name in FILES} == {
        name: (model_dir / name).read_bytes() for name in FILES
    }


def test_rewriting_the_same_directory_leaves_it_unchanged(model_dir: Path) -> None:
    before = {name: (model_dir / name).read_bytes() for name in FILES}
    write_builtin_model(model_dir)
    assert {name: (model_dir / name).read_bytes() for name in FILES} == before


def test_config_is_a_small_tied_llama_sized_to_the_tokenizer(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = [config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")]
    assert shape == [256, 4, 8, 4]
    assert (config["head_dim"], config["intermediate_size"], config["max_position_embeddings"]) == (32, 688, 2048)
    assert (config["vocab_size"], config["tie_word_embeddings"], config["torch_dtype"]) == (1000, True, "float32")
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_tokenizer_loads_with_llama_special_ids(model_dir: Path) -> None:
    tokenizer = Tokenizer(model_dir)
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1000, 1, (2,))
    assert tokenizer.all_special_ids == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_tokenizer_round_trips_any_text_with_a_leading_bos(model_dir: Path) -> None:
    tokenizer = Tokenizer(model_dir)
    text = "The harbour town woke slowly. Unseen words, 数字 42 and emoji 🚀 survive too!\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 1
    assert tokenizer.decode(ids) == text


def test_common_words_of_the_training_text_are_single_pieces(model_dir: Path) -> None:
    tokenizer = Tokenizer(model_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("The town and the library", False)) == [
        "The", "Ġtown", "Ġand", "Ġthe", "Ġlibrary",
    ]  # fmt: skip


def test_its_chat_template_renders_a_conversation_as_transformers_does(model_dir: Path) -> None:
    tokenizer = Tokenizer(model_dir)
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"})
    ids = ChatTemplate(tokenizer, None).prompt_token_ids(Conversation(messages))
    reference = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=False)
    assert reference == "<s>system: Be brief.\nuser: Hello there\nassistant:"
    assert list(ids) == tokenizer.encode(reference, add_special_tokens=False)
