"""The random dataset of `vllm bench`: prompts of random token ids with lengths drawn around a target."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One benchmark request: prompt token ids and the number of tokens to generate; prompt_text, when set, is text
    that the model's tokenizer turns into exactly prompt_token_ids (for endpoints that take text only)."""

    prompt_token_ids: tuple[int, ...]
    output_len: int
    prompt_text: str | None = None


def _length_range(target: int, range_ratio: float) -> tuple[int, int]:
    """[target * (1 - r), target * (1 + r)], never below one token."""
    return max(1, int(target * (1.0 - range_ratio))), max(1, int(target * (1.0 + range_ratio)))


def sample_random_requests(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """num_prompts requests whose prompt ids are uniform in [0, vocab_size); same seed, same requests."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(
            f"num_prompts, input_len and output_len must be >= 1, got {num_prompts, input_len, output_len}"
        )
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    in_low, in_high = _length_range(input_len, range_ratio)
    out_low, out_high = _length_range(output_len, range_ratio)
    requests = []
    for _ in range(num_prompts):
        length = rng.randint(in_low, in_high)
        prompt = tuple(rng.randrange(vocab_size) for _ in range(length))
        requests.append(BenchRequest(prompt, rng.randint(out_low, out_high)))
    return requests
