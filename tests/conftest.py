"""Fixtures every test package shares: the paths of the shared test data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import shared_data


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-kernel-variants", action="store_true",
                     help="compile every kernel instantiation to PTX (tests/kernels/test_kernel_sources.py)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_data.shared_dir()


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    return shared_data.stories260k_dir()


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    return shared_data.llama2_tokenizer_dir()
