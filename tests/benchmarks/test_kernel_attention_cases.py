"""The attention benchmark's decode cases can be narrowed from its command line, to positive integers only."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import kernel_attention


def test_a_comma_separated_list_is_the_batches_or_contexts_to_time() -> None:
    assert kernel_attention.int_list("16,64") == (16, 64)
    assert kernel_attention.int_list("2048") == (2048,)


@pytest.mark.parametrize("text", ["0,16", "-1", "16,,64", "x"])
def test_anything_but_positive_integers_is_refused(text: str) -> None:
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        kernel_attention.int_list(text)
