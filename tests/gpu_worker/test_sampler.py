"""Tests of the worker's sampler: greedy, bans, penalties, filters, seeded streams, distribution, logprobs."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, cast

import numpy as np
import pytest
import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.grammar import SequenceGrammar
from pagedserve.gpu_worker.logits_processors import apply_penalties
from pagedserve.gpu_worker.sampler import Sampler, SamplingRow
from tests.gpu_marks import NEEDS_GPU

CPU = torch.device("cpu")


def _row(
    prompt: tuple[int, ...] = (), output: tuple[int, ...] = (), sample_index: int = 0,
    banned_token_ids: tuple[int, ...] = (), **params: object,
) -> SamplingRow:
    params_ = SamplingParams(**params)  # type: ignore[arg-type]
    return SamplingRow.of(params_, banned_token_ids, prompt, output, sample_index)  # as the worker builds them


def _logits_from_probs(probs: list[float], num_rows: int) -> torch.Tensor:
    return torch.tensor(probs).log().repeat(num_rows, 1)


def _random_logits(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}, {"presence_penalty": 0.5}])
def test_greedy_picks_argmax_of_each_row(extra: dict[str, Any]) -> None:
    logits = _random_logits(6, 40, seed=1)
    result = Sampler(40, CPU).sample(logits, [_row(temperature=0.0, **extra) for _ in range(6)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1}])
def test_greedy_ties_pick_lowest_token_id(extra: dict[str, Any]) -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    result = Sampler(4, CPU).sample(logits, [_row(temperature=0.0, **extra) for _ in range(2)])
    assert result.token_ids == [1, 0]


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=NEEDS_GPU)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_logits_sample_as_their_float32_values(device: torch.device, dtype: torch.dtype) -> None:
    """A model's logits come in its own dtype: a greedy batch argmaxes them as they are, the rest is sampled from
    their float32 values, the same tokens and logprobs as from a float32 copy; prompt logprobs are computed in
    float32 too."""
    logits = _random_logits(6, 300, seed=11).to(device, dtype)
    greedy = [_row(temperature=0.0) for _ in range(6)]
    assert Sampler(300, device, logits_dtype=dtype).sample(logits, greedy).token_ids == logits.float().argmax(
        dim=-1).tolist()
    mixed = [_row(temperature=0.8, seed=row, logprobs=2, presence_penalty=0.5) for row in range(3)] + greedy[3:]
    got = Sampler(300, device, logits_dtype=dtype).sample(logits, mixed)
    expected = Sampler(300, device).sample(logits.float(), mixed)
    assert got.token_ids == expected.token_ids
    assert got.logprobs == expected.logprobs
    entries = Sampler(300, device).prompt_logprobs(logits, [1, 2, 3, 4, 5, 6], k=1)
    expected_entries = Sampler(300, device).prompt_logprobs(logits.float(), [1, 2, 3, 4, 5, 6], k=1)
    for entry, expected_entry in zip(entries, expected_entries, strict=True):
        assert (entry.token_id, entry.top_token_ids) == (expected_entry.token_id, expected_entry.top_token_ids)
        assert entry.logprob == pytest.approx(expected_entry.logprob, abs=1e-6)


def test_greedy_rows_stay_argmax_inside_a_random_batch() -> None:
    logits = _random_logits(8, 50, seed=2)
    rows = [_row(temperature=0.0) if i % 2 else _row(temperature=1.5) for i in range(8)]
    result = Sampler(50, CPU).sample(logits, rows)
    assert result.token_ids[1::2] == logits[1::2].argmax(dim=-1).tolist()


def test_min_tokens_bans_eos_until_reached() -> None:
    eos = 5
    logits = torch.tensor([[0.0, 1.0, 4.0, 0.5, 0.0, 9.0]])
    sampler = Sampler(6, CPU)
    options: dict[str, Any] = {"temperature": 0.0, "min_tokens": 3, "banned_token_ids": (eos,)}
    assert sampler.sample(logits, [_row(output=(1, 2), **options)]).token_ids == [2]
    assert sampler.sample(logits, [_row(output=(1, 2, 3), **options)]).token_ids == [eos]


@pytest.mark.parametrize("extra", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.0,
                                                                                          "logprobs": 2}])
def test_a_row_whose_allowed_ids_are_all_banned_is_flagged_and_the_rows_beside_it_sample_as_usual(
    extra: dict[str, Any],
) -> None:
    eos = 5
    logits = torch.tensor([[0.0, 1.0, 4.0, 0.5, 0.0, 9.0]]).repeat(3, 1)
    rows = [_row(output=(1,), allowed_token_ids=(eos,), min_tokens=3, banned_token_ids=(eos,), **extra),
            _row(allowed_token_ids=(2, 3), **extra), _row(output=(1, 2, 3), allowed_token_ids=(eos,), min_tokens=3,
                                                          banned_token_ids=(eos,), **extra)]
    result = Sampler(6, CPU).sample(logits, rows)
    assert result.no_choice == {0}
    assert result.token_ids[1] in (2, 3) and result.token_ids[2] == eos
    assert all(0 <= token_id < 6 for token_id in result.token_ids)  # the stand-in too: the next step reads it


def test_rows_with_a_choice_are_never_flagged() -> None:
    logits = _random_logits(8, 40, seed=4)
    rows = [_row(temperature=0.0, allowed_token_ids=(3, 7)), _row(temperature=0.8, bad_words=(), min_tokens=2,
                                                                  banned_token_ids=(1, 2))] * 4
    assert Sampler(40, CPU).sample(logits, rows).no_choice == frozenset()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5], [1.0, 1.0, -2.0, 2.0, -3.0]])
    expected = logits.clone()
    expected[0, 0] = 2.0 / 2.0  # in prompt
    expected[0, 1] = -1.0 * 2.0  # in output
    expected[1, 3] = 2.0 / 1.5  # in output
    expected[1, 4] = -3.0 * 1.5  # in prompt
    apply_penalties(logits, [(0,), (4, 4)], [(1, 1), (3,)], [2.0, 1.5], [0.0, 0.0], [0.0, 0.0])
    assert torch.equal(logits, expected)


def test_frequency_and_presence_penalties_subtract_scaled_output_counts() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5], [1.0, 1.0, -2.0, 2.0, -3.0]])
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
    frequency = torch.tensor([[0.25], [1.0]])
    presence = torch.tensor([[0.5], [0.75]])
    expected = logits - (frequency * counts + presence * (counts > 0))
    # Prompt tokens (0 and 3) count for neither penalty.
    apply_penalties(logits, [(0,), (3,)], [(1, 2, 1, 1), (4, 4)], [1.0, 1.0], [0.25, 1.0], [0.5, 0.75])
    assert torch.equal(logits, expected)


def test_penalties_apply_only_to_rows_that_request_them() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]]).repeat(3, 1)
    rows = [
        _row(output=(0,), temperature=0.0, presence_penalty=2.0),
        _row(output=(0,), temperature=0.0),
        _row(prompt=(0,), temperature=0.0, repetition_penalty=2.0),
    ]
    assert Sampler(3, CPU).sample(logits, rows).token_ids == [1, 0, 1]


def test_sample_leaves_input_logits_unchanged() -> None:
    logits = _random_logits(3, 20, seed=3)
    before = logits.clone()
    rows = [_row((1,), (2,), temperature=0.8, top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=2,
                 banned_token_ids=(0,), logprobs=1)] * 3
    Sampler(20, CPU).sample(logits, rows)
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy() -> None:
    logits = _random_logits(64, 50, seed=4)
    result = Sampler(50, CPU, seed=7).sample(logits, [_row(temperature=1.0, top_k=1)] * 64)
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_equals_greedy() -> None:
    logits = _random_logits(64, 50, seed=5)
    result = Sampler(50, CPU, seed=7).sample(logits, [_row(temperature=1.0, top_p=1e-6)] * 64)
    assert result.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_samples_exactly_the_k_best_tokens() -> None:
    logits = _logits_from_probs([0.05, 0.3, 0.1, 0.25, 0.2, 0.1], 2000)
    result = Sampler(6, CPU).sample(logits, [_row(temperature=1.0, top_k=3)] * 2000)
    assert set(result.token_ids) == {1, 3, 4}


def test_top_p_samples_exactly_the_smallest_nucleus() -> None:
    # Mass ranked above each token: 0.0, 0.5, 0.8, 0.95; top_p 0.7 keeps the first two.
    logits = _logits_from_probs([0.15, 0.5, 0.05, 0.3], 2000)
    result = Sampler(4, CPU).sample(logits, [_row(temperature=1.0, top_p=0.7)] * 2000)
    assert set(result.token_ids) == {1, 3}


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    # Top-2 renormalised: 0.625, 0.375; top_p 0.6 then keeps only the best token.
    logits = _logits_from_probs([0.5, 0.3, 0.2], 500)
    result = Sampler(3, CPU).sample(logits, [_row(temperature=1.0, top_k=2, top_p=0.6)] * 500)
    assert set(result.token_ids) == {0}


def test_each_row_keeps_its_own_filter_inside_a_mixed_batch() -> None:
    logits = _logits_from_probs([0.05, 0.3, 0.1, 0.25, 0.2, 0.1], 3000)
    filters = [{"top_k": 2}, {"top_p": 0.5}, {"min_p": 0.5}]
    rows = [_row(temperature=1.0, **filters[i % 3]) for i in range(3000)]  # type: ignore[arg-type]
    tokens = Sampler(6, CPU).sample(logits, rows).token_ids
    assert [set(tokens[i::3]) for i in range(3)] == [{1, 3}, {1, 3}, {1, 3, 4}]


def test_min_p_samples_exactly_the_allowed_set() -> None:
    # min_p 0.3 of the best probability 0.4 is 0.12: tokens 0, 1 and 2 remain.
    logits = _logits_from_probs([0.4, 0.3, 0.15, 0.1, 0.05], 1000)
    rows = [_row(temperature=1.0, min_p=0.3, seed=seed) for seed in range(1000)]
    assert set(Sampler(5, CPU).sample(logits, rows).token_ids) == {0, 1, 2}


def test_seeded_row_gives_the_same_token_alone_and_inside_a_batch() -> None:
    vocab_size = 1000
    target = _random_logits(1, vocab_size, seed=6) * 0.1
    others = _random_logits(5, vocab_size, seed=7)
    busy = Sampler(vocab_size, CPU, seed=123)
    busy.sample(others, [_row(temperature=1.0)] * 5)
    alone_tokens, batched_tokens = [], []
    for seed in range(20):
        row = _row(output=(4, 2), sample_index=1, temperature=0.9, top_p=0.95, seed=seed)
        alone_tokens.append(Sampler(vocab_size, CPU).sample(target, [row]).token_ids[0])
        batch = torch.cat([others[:2], target, others[2:4]])
        companions = [_row(temperature=1.0), _row(temperature=0.0), _row(temperature=0.7, top_k=10, seed=9)]
        rows = [*companions[:2], row, companions[2], _row(temperature=1.2, min_p=0.05, logprobs=2)]
        batched_tokens.append(busy.sample(batch, rows).token_ids[2])
    assert batched_tokens == alone_tokens
    assert len(set(alone_tokens)) > 10


def test_different_sample_index_gives_different_streams() -> None:
    vocab_size = 1000
    logits = torch.zeros(2, vocab_size)
    sampler = Sampler(vocab_size, CPU)
    num_equal = 0
    for step in range(200):
        output = tuple(range(step))
        rows = [_row(output=output, sample_index=i, temperature=1.0, seed=42) for i in range(2)]
        first, second = sampler.sample(logits, rows).token_ids
        num_equal += first == second
    # Independent uniform draws over 1000 tokens agree about 0.2 times in 200 steps.
    assert num_equal <= 3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_unseeded_draws_match_softmax_within_tolerance(temperature: float) -> None:
    num_draws = 20_000
    base = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    result = Sampler(5, CPU, seed=11).sample(base.repeat(num_draws, 1), [_row(temperature=temperature)] * num_draws)
    counts = Counter(result.token_ids)
    expected = (base / temperature).softmax(dim=-1)[0].tolist()
    # The standard error of a frequency is at most sqrt(0.25 / 20000) = 0.0035; 0.015 is over 4 of them.
    for token_id, probability in enumerate(expected):
        assert abs(counts[token_id] / num_draws - probability) < 0.015


def test_logprobs_are_raw_log_softmax_with_rank_and_top_k() -> None:
    logits = _random_logits(4, 30, seed=8)
    rows = [_row((3,), (5, 5), temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=3)] * 4
    result = Sampler(30, CPU).sample(logits, rows)
    raw = logits.log_softmax(dim=-1)
    for row, (token_id, entry) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert entry is not None
        assert entry.token_id == token_id
        assert entry.logprob == pytest.approx(raw[row, token_id].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[row] > raw[row, token_id]).sum())
        assert list(entry.top_token_ids) == raw[row].argsort(descending=True)[:3].tolist()
        assert entry.top_logprobs == pytest.approx(raw[row].sort(descending=True).values[:3].tolist(), abs=1e-6)


def test_logprobs_zero_returns_only_the_chosen_token_and_none_for_rows_not_asking() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    result = Sampler(3, CPU).sample(logits, [_row(temperature=0.0, logprobs=0), _row(temperature=0.0)])
    entry = result.logprobs[0]
    assert entry is not None
    assert (entry.token_id, entry.rank, entry.top_token_ids, entry.top_logprobs) == (1, 1, (), ())
    assert entry.logprob == pytest.approx(2.0 - math.log(1.0 + math.exp(2.0) + math.exp(1.0)), abs=1e-6)
    assert result.logprobs[1] is None


def test_prompt_logprobs_match_log_softmax_of_targets() -> None:
    logits = _random_logits(5, 12, seed=9)
    targets = [3, 0, 11, 7, 7]
    entries = Sampler(12, CPU).prompt_logprobs(logits, targets, k=2)
    raw = logits.log_softmax(dim=-1)
    assert [entry.token_id for entry in entries] == targets
    for position, (target, entry) in enumerate(zip(targets, entries, strict=True)):
        assert entry.logprob == pytest.approx(raw[position, target].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[position] > raw[position, target]).sum())
        assert list(entry.top_token_ids) == raw[position].argsort(descending=True)[:2].tolist()
        assert entry.top_logprobs == pytest.approx(raw[position].sort(descending=True).values[:2].tolist(), abs=1e-6)


def test_token_ids_outside_the_vocabulary_are_rejected() -> None:
    sampler = Sampler(4, CPU)
    with pytest.raises(ValueError, match="token id 9"):
        sampler.sample(torch.zeros(1, 4), [_row(output=(9,), temperature=0.0, presence_penalty=1.0)])
    with pytest.raises(ValueError, match="token id -1"):
        sampler.prompt_logprobs(torch.zeros(1, 4), [-1], k=1)


def test_logits_of_the_wrong_shape_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"shape \[2, 4\]"):
        Sampler(4, CPU).sample(torch.zeros(2, 5), [_row(), _row()])


@pytest.mark.parametrize("params", [
    {"logprobs": 1}, {"presence_penalty": 0.5}, {"allowed_token_ids": (3, 4)}, {"logit_bias": {3: -50.0}},
    {"temperature": 0.5},
])
def test_a_row_that_reads_or_changes_its_logits_is_never_an_argmax(params: dict[str, Any]) -> None:
    assert _row(**{"temperature": 0.0, **params}).greedy_from is None


def test_a_greedy_row_is_a_plain_argmax_only_once_its_min_tokens_bans_are_over() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2, 1)  # token 3 is every row's argmax
    rows = [_row(output=(5,), banned_token_ids=(3,), temperature=0.0, min_tokens=2),
            _row(output=(5, 6), banned_token_ids=(3,), temperature=0.0, min_tokens=2)]
    assert [row.greedy_from for row in rows] == [2, 2]
    assert _row(temperature=0.0, min_tokens=2).greedy_from == 0  # nothing to ban
    assert Sampler(4, CPU).sample(logits, rows).token_ids == [2, 3]
    # A row built directly does not know its threshold: the per-row plan bans the token all the same.
    direct = SamplingRow(rows[0].params, (3,), (), (5,))
    assert direct.greedy_from is None
    assert Sampler(4, CPU).sample(logits[:1], [direct]).token_ids == [2]


def _bitmasks(allowed: list[set[int]], vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 token bitmasks, bit t of a row set when t is allowed."""
    words = np.zeros((len(allowed), -(-vocab_size // 32)), dtype=np.uint32)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            words[row, token // 32] |= np.uint32(1 << (token % 32))
    return torch.from_numpy(words.view(np.int32))


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=NEEDS_GPU)], ids=str)
def test_a_greedy_row_with_a_grammar_is_the_argmax_of_the_tokens_its_mask_allows(device: torch.device) -> None:
    """Whether the batch takes the plain-greedy path (every row an argmax) or the per-row plan (a row asks for
    logprobs), and whether every row or some have a grammar, a grammar row's token is its best allowed token."""
    vocab_size = 40
    logits = _random_logits(3, vocab_size, seed=7).to(device)
    grammar = cast(SequenceGrammar, object())  # stands for a grammar whose masks are computed ahead
    allowed = [{5, 31, 33}, {0}]
    candidates = sorted(allowed[0])
    expected = [candidates[int(logits[1, candidates].argmax())], 0]
    assert logits[1:].argmax(dim=-1).tolist() != expected  # the masks decide
    greedy = SamplingParams(temperature=0.0)
    grammar_rows = [SamplingRow.of(greedy, (), (), (), grammar=grammar) for _ in allowed]
    assert all(row.greedy_from == 0 for row in grammar_rows)
    sampler = Sampler(vocab_size, device)
    every_row = sampler.start(logits[1:], grammar_rows, _bitmasks(allowed, vocab_size)).result().token_ids
    assert every_row == expected
    masks = _bitmasks([set(range(vocab_size)), *allowed], vocab_size)  # the first row has no grammar
    for first in (_row(temperature=0.0), _row(temperature=0.0, logprobs=1)):
        tokens = sampler.start(logits, [first, *grammar_rows], masks).result().token_ids
        assert tokens == [int(logits[0].argmax()), *expected]
