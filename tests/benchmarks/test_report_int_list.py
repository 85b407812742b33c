"""The benchmarks' list flags (kernel_attention's --batches and --contexts, fp8_gemv_rows' --rows) take positive
integers separated by commas, and nothing else."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import report


def test_a_comma_separated_list_is_its_integers_in_order() -> None:
    assert report.int_list("16,64") == (16, 64)
    assert report.int_list("2048") == (2048,)


@pytest.mark.parametrize("text", ["0,16", "-1", "16,,64", "x"])
def test_anything_but_positive_integers_is_refused(text: str) -> None:
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        report.int_list(text)
