"""The random dataset: lengths within the range ratio, ids inside the vocabulary, reproducible by seed."""

from __future__ import annotations

from benchmarks.random_dataset import sample_random_requests


def test_lengths_stay_within_the_range_ratio_and_ids_within_the_vocabulary() -> None:
    requests = sample_random_requests(200, 100, 20, 0.5, vocab_size=7, seed=3)
    assert {len(r.prompt_token_ids) for r in requests} <= set(range(50, 151))
    assert {r.output_len for r in requests} <= set(range(10, 31))
    assert {t for r in requests for t in r.prompt_token_ids} == set(range(7))


def test_zero_range_ratio_gives_exact_lengths() -> None:
    requests = sample_random_requests(5, 12, 3, 0.0, vocab_size=100, seed=0)
    assert [(len(r.prompt_token_ids), r.output_len) for r in requests] == [(12, 3)] * 5


def test_same_seed_gives_the_same_requests_and_another_seed_does_not() -> None:
    first = sample_random_requests(4, 16, 4, 0.2, vocab_size=1000, seed=1)
    assert sample_random_requests(4, 16, 4, 0.2, vocab_size=1000, seed=1) == first
    assert sample_random_requests(4, 16, 4, 0.2, vocab_size=1000, seed=2) != first
