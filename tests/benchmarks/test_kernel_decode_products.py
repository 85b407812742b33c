"""The decode-products benchmark checks the GEMV against the exact product, within what one rounding allows."""

from __future__ import annotations

import torch

from benchmarks.kernel_decode_products import product_error


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 512, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(256, 512, generator=gen) / 64).to(torch.bfloat16)
    return x, weight, (x.double() @ weight.double().T)


def test_the_exact_product_rounded_once_passes() -> None:
    x, weight, exact = _inputs()
    assert product_error(exact.to(torch.bfloat16), x, weight) == 0.0


def test_the_neighbouring_value_passes_where_a_bound_relative_to_the_mean_failed() -> None:
    x, weight, exact = _inputs()
    got = exact.to(torch.bfloat16)
    largest = int(exact.abs().argmax())
    bits = got.view(-1).view(torch.int16)
    bits[largest] += 1  # one unit in the last place further from zero
    assert got.view(-1)[largest] != exact.to(torch.bfloat16).view(-1)[largest]
    assert product_error(got, x, weight) == 0.0
    # The check this replaced: the largest difference against 2 % of the mean magnitude.
    assert (got.double() - exact).abs().max() / exact.abs().mean() > 2e-2


def test_one_output_off_by_a_percent_of_itself_fails() -> None:
    x, weight, exact = _inputs()
    got = exact.clone()
    got.view(-1)[exact.abs().argmax()] *= 1.05
    assert product_error(got.to(torch.bfloat16), x, weight) > 1e-3
