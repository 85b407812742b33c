"""IncrementalDetokenizer: its deltas add up to the exact decode, hold back unfinished characters, and
decode only a few tokens per step."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import decoders

from pagedserve.control_plane.launch.builtin_model import write_builtin_model
from pagedserve.control_plane.text.detokenizer import IncrementalDetokenizer
from pagedserve.control_plane.text.piece_texts import appends_pieces_independently
from pagedserve.control_plane.text.tokenizer import Tokenizer

MIXED_TEXT = (
    "Hello, world! 你好，世界。今日は良い天気ですね。🙂🚀👍🏽 Zürich façade naïve — “quotes” ∑∫√ "
    "한국어 텍스트 🇫🇷 Ελληνικά русский 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end."
)


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer_dir)


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path) -> Tokenizer:
    return Tokenizer(stories260k_dir)


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_builtin_model(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def builtin(builtin_dir: Path) -> Tokenizer:
    return Tokenizer(builtin_dir)


def _deltas(
    tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool, rng: random.Random
) -> list[str]:
    """Streams output in random chunks of 1-3 tokens; the last delta is finish()'s."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip)
    deltas: list[str] = []
    i = 0
    while i < len(output):
        size = rng.randrange(1, 4)
        deltas.append(detokenizer.add_tokens(output[i : i + size]))
        i += size
    deltas.append(detokenizer.finish())
    return deltas


def _text_after_prompt(tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool) -> str:
    full = tokenizer.decode([*prompt, *output], skip_special_tokens=skip)
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def _assert_no_invented_replacement_chars(deltas: list[str], expected: str) -> None:
    offset = 0
    for delta in deltas:
        assert all(expected[offset + i] == "\ufffd" for i, c in enumerate(delta) if c == "\ufffd")
        offset += len(delta)


def _random_output(tokenizer: Tokenizer, rng: random.Random, length: int) -> list[int]:
    """Uniform ids mixed with many byte pieces and special tokens, the hard cases for a decoder."""
    byte_ids = sorted(tokenizer.byte_token_ids) or list(range(tokenizer.vocab_size))
    special_ids = list(tokenizer.all_special_ids)
    choices: list[int] = []
    for _ in range(length):
        roll = rng.random()
        pool = byte_ids if roll < 0.4 else special_ids if roll < 0.5 else range(tokenizer.vocab_size)
        choices.append(rng.choice(pool))
    return choices


def _check_random_sequences(tokenizer: Tokenizer, seed: int, with_prompt: bool) -> None:
    rng = random.Random(seed)
    word_ids = tokenizer.encode("Once upon a time there was a little dog", add_special_tokens=False)
    for _ in range(300):
        skip = rng.random() < 0.5
        output = _random_output(tokenizer, rng, rng.randrange(1, 40))
        prompt: list[int] = []
        if with_prompt:  # arbitrary ids, ending on a whole word so the prompt's text is a prefix
            prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 8))]
            prompt.append(rng.choice(word_ids))
        deltas = _deltas(tokenizer, prompt, output, skip, rng)
        expected = _text_after_prompt(tokenizer, prompt, output, skip)
        assert "".join(deltas) == expected
        _assert_no_invented_replacement_chars(deltas, expected)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_llama2_random_ids_add_up_to_the_exact_decode(llama2: Tokenizer, with_prompt: bool) -> None:
    _check_random_sequences(llama2, seed=1, with_prompt=with_prompt)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_stories260k_random_ids_add_up_to_the_exact_decode(stories: Tokenizer, with_prompt: bool) -> None:
    _check_random_sequences(stories, seed=2, with_prompt=with_prompt)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_builtin_random_ids_add_up_to_the_exact_decode(builtin: Tokenizer, with_prompt: bool) -> None:
    _check_random_sequences(builtin, seed=3, with_prompt=with_prompt)


def test_without_prompt_the_deltas_are_exactly_decode_of_the_output(llama2: Tokenizer) -> None:
    rng = random.Random(4)
    for _ in range(200):
        output = _random_output(llama2, rng, rng.randrange(1, 30))
        skip = rng.random() < 0.5
        assert "".join(_deltas(llama2, [], output, skip, rng)) == llama2.decode(output, skip)


def test_byte_level_deltas_equal_decode_of_the_output_after_any_prompt(builtin: Tokenizer) -> None:
    rng = random.Random(5)
    prompt = builtin.encode("The harbour town woke slowly")
    for _ in range(200):
        output = _random_output(builtin, rng, rng.randrange(1, 30))
        assert "".join(_deltas(builtin, prompt, output, True, rng)) == builtin.decode(output, True)


@pytest.mark.parametrize("tokenizer_name", ["llama2", "stories", "builtin"])
@pytest.mark.parametrize("skip", [True, False])
def test_cjk_and_emoji_text_streams_without_broken_characters(
    tokenizer_name: str, skip: bool, request: pytest.FixtureRequest
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    prompt = tokenizer.encode("Say it:")
    output = tokenizer.encode(MIXED_TEXT, add_special_tokens=False) + list(tokenizer.eos_token_ids)
    deltas = _deltas(tokenizer, prompt, output, skip, random.Random(6))
    assert "".join(deltas) == _text_after_prompt(tokenizer, prompt, output, skip)
    assert not any("\ufffd" in delta for delta in deltas)


def test_first_word_keeps_its_space_after_the_prompt(llama2: Tokenizer) -> None:
    prompt = llama2.encode("Once upon a")
    output = llama2.encode("time there", add_special_tokens=False)
    assert llama2.convert_ids_to_tokens(output) == ["▁time", "▁there"]
    assert "".join(_deltas(llama2, prompt, output, True, random.Random(0))) == " time there"


def test_prompt_ending_in_byte_piece_or_special_token_still_spaces_first_word(llama2: Tokenizer) -> None:
    word = llama2.encode("x", add_special_tokens=False)
    hello = llama2.encode("Hello", add_special_tokens=False)
    assert llama2.convert_ids_to_tokens([3 + 0xE4, 2]) == ["<0xE4>", "</s>"]
    for tail in ([3 + 0xE4], [2]):
        detokenizer = IncrementalDetokenizer(llama2, [1, *word, *tail], skip_special_tokens=True)
        assert detokenizer.add_tokens(hello) == " Hello"


def test_byte_pieces_are_held_until_their_run_ends(llama2: Tokenizer) -> None:
    emoji = llama2.encode("😀", add_special_tokens=False)[1:]
    assert llama2.convert_ids_to_tokens(emoji) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detokenizer = IncrementalDetokenizer(llama2, [1], skip_special_tokens=True)
    assert [detokenizer.add_tokens([t]) for t in emoji] == ["", "", "", ""]
    assert detokenizer.add_tokens(llama2.encode("ok", add_special_tokens=False)) == "😀 ok"
    assert detokenizer.finish() == ""


def test_a_later_invalid_byte_rewrites_its_whole_run_so_nothing_was_emitted_early(llama2: Tokenizer) -> None:
    ni = [3 + b for b in "你".encode()]
    detokenizer = IncrementalDetokenizer(llama2, [1], skip_special_tokens=True)
    assert [detokenizer.add_tokens([t]) for t in ni] == ["", "", ""]
    assert detokenizer.add_tokens([3 + 0xE5]) == ""
    assert detokenizer.finish() == "\ufffd" * 4 == llama2.decode([*ni, 3 + 0xE5])


def test_finish_releases_held_text_once(llama2: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(llama2, [1], skip_special_tokens=True)
    assert detokenizer.add_tokens([3 + 0xE4, 3 + 0xBD]) == ""
    assert detokenizer.finish() == llama2.decode([3 + 0xE4, 3 + 0xBD])
    assert detokenizer.finish() == ""


class _WindowSpy(Tokenizer):
    """A tokenizer recording how often decode() was called and the longest id sequence it was asked for."""

    longest = 0
    num_calls = 0

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(token_ids))
        self.num_calls += 1
        return super().decode(token_ids, skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_output(llama2_tokenizer_dir: Path) -> None:
    spy = _WindowSpy(llama2_tokenizer_dir)
    words = spy.encode(" ".join(["stream 你好 🙂 tokens"] * 200), add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(spy, spy.encode("Prompt text with a few words"), True)
    text = "".join(detokenizer.add_tokens([t]) for t in words) + detokenizer.finish()
    longest_window = spy.longest
    assert len(words) == 2000
    assert text == " " + spy.decode(words)
    assert longest_window <= 6


@pytest.mark.parametrize("model_dir", ["llama2_tokenizer_dir", "builtin_dir"])
def test_one_token_steps_over_plain_pieces_do_not_decode(model_dir: str, request: pytest.FixtureRequest) -> None:
    spy = _WindowSpy(request.getfixturevalue(model_dir))
    prompt = spy.encode("Once upon a time")
    words = spy.encode(" there was a little dog who liked to run in the park" * 20, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(spy, prompt, True)
    num_calls_at_start = spy.num_calls
    text = "".join(detokenizer.add_tokens([t]) for t in words) + detokenizer.finish()
    num_calls = spy.num_calls - num_calls_at_start
    assert text == _text_after_prompt(spy, prompt, words, True)
    assert num_calls == 0


@pytest.mark.parametrize("decoder", [
    decoders.BPEDecoder(),  # the last piece loses its end-of-word space
    decoders.CTC(),  # repeated pieces merge
    decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 0, 1)]),  # trims the end
    decoders.Sequence([decoders.Fuse(), decoders.ByteFallback()]),  # fused text can look like one byte piece
    decoders.Replace("ab", "c"),  # a pattern can span two pieces
])
def test_decoders_that_write_a_piece_by_its_neighbours_are_always_decoded(decoder: decoders.Decoder) -> None:
    assert not appends_pieces_independently(json.loads(decoder.__getstate__()))
