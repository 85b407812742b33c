"""vLLM's bad_words on the worker: each word's token sequences, and the tokens they ban after a sequence's outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer


class BadWordsTokenizer:
    """Turns bad words into token sequences with the model's tokenizer, as vLLM's SamplingParams does."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def for_model(cls, model_dir: Path) -> BadWordsTokenizer | None:
        path = model_dir / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path))) if path.is_file() else None

    def token_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Each word tokenized without special tokens as it starts a text, and also after a space when that gives
        a different first token and as many tokens (the word in the middle of a text)."""
        result: list[tuple[int, ...]] = []
        for word in words:
            alone = tuple(self._encode(word.lstrip()))
            if not alone:
                continue
            result.append(alone)
            spaced = tuple(self._encode(" " + word.lstrip()))
            if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                result.append(spaced)
        return tuple(result)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


def bad_word_bans(bad_words_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[int]) -> list[int]:
    """The tokens that would complete a bad word next: a one-token word always, a longer one when the outputs end
    with all of it but its last token."""
    banned = []
    for word in bad_words_token_ids:
        prefix = word[:-1]
        if len(output_token_ids) >= len(prefix) and list(output_token_ids[len(output_token_ids) - len(prefix):]) \
                == list(prefix):
            banned.append(word[-1])
    return banned
