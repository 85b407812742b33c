"""Where the test data shared by every checkout lives: the directory `shared` beside the repository.

The one place that computes its path. Tests take it from the fixtures in tests/conftest.py; only code that
needs a path at import time (module constants, collection) calls these functions directly.
"""

from __future__ import annotations

from pathlib import Path


def shared_dir() -> Path:
    """The shared data directory, ../shared beside the repository root."""
    return Path(__file__).resolve().parents[2] / "shared"


def stories260k_dir() -> Path:
    """The stories260K model directory: config, weights, tokenizer and golden_greedy.json."""
    return shared_dir() / "models" / "stories260K"


def llama2_tokenizer_dir() -> Path:
    """The Llama 2 tokenizer directory (vocabulary 32000), without weights."""
    return shared_dir() / "tokenizers" / "llama2"
