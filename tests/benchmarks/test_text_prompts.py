"""Random prompts made text: the text tokenizes to exactly the ids the request carries, at the asked length where
the vocabulary allows, reproducibly."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from benchmarks.random_dataset import sample_random_requests
from benchmarks.text_prompts import with_text_prompts


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(llama2_tokenizer_dir)


def test_text_tokenizes_to_the_requests_ids_at_the_asked_length(
    llama2: transformers.PreTrainedTokenizerBase,
) -> None:
    requests = sample_random_requests(8, 200, 4, 0.0, vocab_size=32000, seed=5)
    converted = with_text_prompts(requests, llama2, vocab_size=32000, seed=5)
    for before, after in zip(requests, converted, strict=True):
        assert after.prompt_text is not None
        assert tuple(llama2.encode(after.prompt_text, add_special_tokens=False)) == after.prompt_token_ids
        assert len(after.prompt_token_ids) == 200 and after.output_len == before.output_len
    assert with_text_prompts(requests, llama2, vocab_size=32000, seed=5) == converted
