"""logit_bias: added to the listed tokens' logits before sampling, for greedy and random rows alike."""

from __future__ import annotations

import torch

from pagedserve.contract.sampling_params import SamplingParams
from pagedserve.gpu_worker.sampler import Sampler, SamplingRow

CPU = torch.device("cpu")


def _row(**params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), (), (), (), 0)  # type: ignore[arg-type]


def test_a_bias_moves_the_greedy_choice_only_in_its_own_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 0.0], [0.0, 3.0, 2.0, 0.0]])
    rows = [_row(temperature=0.0, logit_bias={2: 1.5}), _row(temperature=0.0)]
    assert Sampler(4, CPU).sample(logits, rows).token_ids == [2, 1]


def test_the_biased_logits_equal_the_raw_logits_plus_the_bias() -> None:
    vocab_size = 50
    logits = torch.randn(3, vocab_size, generator=torch.Generator().manual_seed(7))
    biases = [{5: 2.5, 17: -100.0}, {}, {49: 0.75, 0: -1.0}]
    expected = logits.clone()
    for row, bias in enumerate(biases):
        for token_id, value in bias.items():
            expected[row, token_id] += value
    rows = [_row(temperature=0.0, logit_bias=bias) for bias in biases]
    assert Sampler(vocab_size, CPU).sample(logits, rows).token_ids == expected.argmax(dim=-1).tolist()


def test_a_minus_100_bias_keeps_a_random_row_off_the_token() -> None:
    logits = torch.zeros(64, 4)
    rows = [_row(temperature=1.0, seed=i, logit_bias={0: -100.0, 1: -100.0}) for i in range(64)]
    assert set(Sampler(4, CPU).sample(logits, rows).token_ids) <= {2, 3}


def test_logprobs_stay_those_of_the_raw_logits() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 0.0]])
    result = Sampler(4, CPU).sample(logits, [_row(temperature=0.0, logprobs=0, logit_bias={2: 5.0})])
    (logprobs,) = result.logprobs
    assert result.token_ids == [2]
    assert logprobs is not None
    assert abs(logprobs.logprob - float(logits.log_softmax(-1)[0, 2])) < 1e-6
