"""Tokenizer: loads a local model directory without torch and reports ids the way the engine needs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from pagedserve.control_plane.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


def test_llama2_vocabulary_and_special_ids(llama2: Tokenizer) -> None:
    assert (llama2.vocab_size, llama2.bos_token_id, llama2.all_special_ids) == (32000, 1, (0, 1, 2))


def test_llama2_byte_pieces_are_the_256_byte_fallback_ids(llama2: Tokenizer) -> None:
    assert llama2.byte_token_ids == frozenset(range(3, 259))
    assert llama2.convert_ids_to_tokens([3, 3 + 0xE4, 258]) == ["<0x00>", "<0xE4>", "<0xFF>"]


def test_encode_prepends_bos_only_with_special_tokens(llama2: Tokenizer) -> None:
    assert llama2.encode("Hello world") == [1, 15043, 3186]
    assert llama2.encode("Hello world", add_special_tokens=False) == [15043, 3186]


def test_decode_skips_special_tokens_only_when_asked(llama2: Tokenizer) -> None:
    ids = [1, 15043, 2, 3186]
    assert llama2.decode(ids, skip_special_tokens=True) == "Hello world"
    assert llama2.decode(ids, skip_special_tokens=False) == "<s> Hello</s> world"


def test_text_round_trips_through_byte_fallback(llama2: Tokenizer) -> None:
    text = "naïve 你好 😀 𝔘"
    assert llama2.decode(llama2.encode(text)) == text


def test_ids_outside_the_vocabulary_have_no_piece_and_no_text(llama2: Tokenizer) -> None:
    assert llama2.convert_ids_to_tokens([15043, 32000, 99999]) == ["▁Hello", None, None]
    assert llama2.decode([15043, 32000]) == "Hello"


def _model_dir(llama2_dir: Path, tmp_path: Path, generation_config: dict[str, object] | None) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama2_dir / name, tmp_path / name)
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


@pytest.mark.parametrize(
    ("generation_config", "eos_token_ids"),
    [
        ({"eos_token_id": [2, 32000 - 1]}, (2, 31999)),
        ({"eos_token_id": 7}, (7,)),
        ({"bos_token_id": 1}, (2,)),
        (None, (2,)),
    ],
)
def test_eos_ids_come_from_generation_config_else_the_tokenizer(
    llama2_tokenizer_dir: Path, tmp_path: Path, generation_config: dict[str, object] | None,
    eos_token_ids: tuple[int, ...],
) -> None:
    assert Tokenizer(_model_dir(llama2_tokenizer_dir, tmp_path, generation_config)).eos_token_ids == eos_token_ids


def test_stories260k_reads_its_model_directory(stories260k_dir: Path) -> None:
    tokenizer = Tokenizer(stories260k_dir)
    assert (tokenizer.vocab_size, tokenizer.eos_token_ids, len(tokenizer.byte_token_ids)) == (512, (2,), 256)


def test_loading_a_tokenizer_does_not_import_torch(llama2_tokenizer_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from pagedserve.control_plane.text.tokenizer import Tokenizer; "
        f"Tokenizer(Path({str(llama2_tokenizer_dir)!r})).encode('x'); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("text", "expected"), [
    ("<s>Hello", [1, 15043]),
    ("<s>[INST] Hi [/INST]", [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962]),
    ("<s><s>Hello", [1, 1, 15043]),  # the text's own two are kept: only the added one goes
    (" <s>Hello", [1, 29871, 1, 15043]),  # not at the start: the text's BOS is not the first token
])
def test_a_text_that_starts_with_bos_gets_no_second_one(llama2: Tokenizer, text: str, expected: list[int]) -> None:
    assert llama2.encode(text) == expected


def test_a_text_that_starts_with_bos_encodes_as_without_special_tokens(llama2: Tokenizer) -> None:
    text = "<s>[INST] Once upon a time [/INST]"
    assert llama2.encode(text) == llama2.encode(text, add_special_tokens=False)
    assert llama2.encode(text[3:]) == llama2.encode(text, add_special_tokens=False)


def test_a_llama3_style_templated_prompt_gets_no_second_begin_of_text(tmp_path: Path) -> None:
    """A byte-level BPE tokenizer whose post-processor adds <|begin_of_text|>, as Llama 3's does."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|begin_of_text|>"])
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    tokenizer = Tokenizer(tmp_path)

    plain = tokenizer.encode("Hi")
    templated = tokenizer.encode("<|begin_of_text|>Hi")
    assert plain == templated == [bos_id, vocab["H"], vocab["i"]]
