"""Random prompts as text that tokenizes back to the same ids, so that an endpoint taking text only (the gateway's
/v1/completions) and one taking ids (our Generate) serve the very same tokens."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from benchmarks.random_dataset import BenchRequest

# Rounds of decode -> encode -> trim or pad to the target length before the last round's text is taken as it is.
_MAX_ROUNDS = 8


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids the gateway makes of a completion prompt: the tokenizer's, without special tokens (no BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one text out
    return text


def text_prompt(token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, vocab_size: int, rng: random.Random,
                ) -> tuple[str, tuple[int, ...]]:
    """(text, ids) with ids = the tokenization of text and len(ids) as close to len(token_ids) as the rounds get
    (random ids decode to text that re-encodes to other, usually more, ids: trimmed, or padded with random ids, then
    decoded again until the length holds)."""
    target = len(token_ids)
    ids = list(token_ids)
    text = _decode(tokenizer, ids)
    for _ in range(_MAX_ROUNDS):
        encoded = _encode(tokenizer, text)
        if len(encoded) == target:
            return text, tuple(encoded)
        ids = encoded[:target] + [rng.randrange(vocab_size) for _ in range(target - len(encoded))]
        text = _decode(tokenizer, ids)
    return text, tuple(_encode(tokenizer, text))


def with_text_prompts(requests: Sequence[BenchRequest], tokenizer: PreTrainedTokenizerBase, vocab_size: int, seed: int,
                      ) -> list[BenchRequest]:
    """The requests with prompt_text set and prompt_token_ids replaced by its tokenization; same seed, same
    prompts."""
    rng = random.Random(seed)
    converted = []
    for request in requests:
        text, ids = text_prompt(request.prompt_token_ids, tokenizer, vocab_size, rng)
        converted.append(dataclasses.replace(request, prompt_text=text, prompt_token_ids=ids))
    return converted
