"""vLLM's remaining sampling parameters, each pinned by a hand-computed expectation on stories260K (vocabulary 512)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from pagedserve.clients.llm import LLM, SamplingParams
from pagedserve.contract.errors import InvalidArgumentError
from pagedserve.control_plane.config import CacheConfig
from pagedserve.control_plane.text.detokenizer import IncrementalDetokenizer
from pagedserve.control_plane.text.tokenizer import Tokenizer

PROMPT = "Once upon a time, there was a little girl"


@pytest.fixture(scope="module")
def llm(stories260k_dir: Path) -> Iterator[LLM]:
    with LLM(stories260k_dir, cache_config=CacheConfig(kv_cache_memory_bytes=32 << 20, swap_space_bytes=0),
             worker_process=False) as engine:
        yield engine


def _tokens(llm: LLM, params: SamplingParams, prompt: str = PROMPT) -> list[int]:
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_a_bias_of_100_on_one_token_makes_greedy_emit_it_every_step(llm: LLM) -> None:
    assert _tokens(llm, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={77: 100.0})) \
        == [77] * 5


def test_allowed_token_ids_are_the_only_ones_sampled(llm: LLM) -> None:
    allowed = (40, 41, 300)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=12, allowed_token_ids=allowed) for seed in range(4)]
    for output in llm.generate([PROMPT] * len(params), params):
        assert set(output.outputs[0].token_ids) <= set(allowed)
    # With one allowed token, greedy has no other choice.
    assert _tokens(llm, SamplingParams(temperature=0.0, max_tokens=4, allowed_token_ids=(300,))) == [300] * 4


def test_a_bad_word_never_appears_across_seeds(llm: LLM) -> None:
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    assert " named" in greedy  # the word this test bans is what stories260K writes here
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=32, bad_words=("named",)) for seed in range(6)]
    texts = [output.outputs[0].text for output in llm.generate([PROMPT] * len(params), params)]
    assert [text for text in texts if "named" in text.split()] == []


def test_a_multi_token_bad_word_bans_only_its_last_token_after_its_prefix(llm: LLM) -> None:
    word = llm.tokenizer.encode(" little girl", add_special_tokens=False)
    assert len(word) >= 2
    # Forcing the word's first tokens, then freeing the choice: the word's last token cannot follow them.
    forced = {token_id: 100.0 for token_id in word}
    params = SamplingParams(temperature=0.0, max_tokens=len(word) + 2, ignore_eos=True, logit_bias=forced,
                            bad_words=("little girl",))
    tokens = _tokens(llm, params)
    for start in range(len(tokens) - len(word) + 1):
        assert tokens[start:start + len(word)] != word


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM) -> None:
    full = llm.generate([PROMPT], SamplingParams(max_tokens=1))[0].prompt_token_ids
    kept = llm.generate([PROMPT], SamplingParams(max_tokens=1, truncate_prompt_tokens=4))[0].prompt_token_ids
    assert kept == full[-4:]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"best_of": 2}, "best_of"), ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"bad_words": ("",)}, "bad_words"), ({"allowed_token_ids": (-1,)}, "allowed_token_ids"),
])
def test_values_vllm_refuses_are_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_best_of_equal_to_n_is_accepted() -> None:
    assert SamplingParams(n=3, best_of=3).best_of == 3


def test_an_allowed_token_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    with pytest.raises(InvalidArgumentError, match="^allowed_token_ids: token id 512 is outside"):
        llm.generate([PROMPT], SamplingParams(allowed_token_ids=(512,)))


def _spaced_tokenizer(directory: Path) -> Tokenizer:
    """A word-level tokenizer without a decoder: tokenizers then joins every token with a space."""
    backend = BackendTokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "<a>": 2, "<b>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<a>", "<b>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(directory)


@pytest.mark.parametrize(("spaces", "expected"), [(True, " hi <a> <b> hi"), (False, " hi <a><b> hi")])
def test_spaces_between_special_tokens_decides_what_separates_two_adjacent_ones(
    tmp_path: Path, spaces: bool, expected: str
) -> None:
    tokenizer = _spaced_tokenizer(tmp_path)
    detokenizer = IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=False,
                                         spaces_between_special_tokens=spaces)
    text = "".join(detokenizer.add_tokens([token_id]) for token_id in (1, 2, 3, 1)) + detokenizer.finish()
    assert text == expected
