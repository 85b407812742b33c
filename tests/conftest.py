"""Fixtures every test package shares: the paths of the shared test data."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
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


@pytest.fixture
def unloadable_model_dir(tmp_path: Path, stories260k_dir: Path) -> Path:
    """A model directory that passes the file check before start-up (contract/model_dir.py) but that a worker
    fails to load: stories260K's config and tokenizer beside weights that are not safetensors."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories260k_dir / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    return tmp_path


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port that a plain socket listens on for the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])
