"""A record names the commit it measured, and says when the tree it ran from differs from that commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.report import git_commit


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("PAGEDSERVE_BENCH_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "kernel.cu").write_text("one\\n")
    _git(tmp_path, "add", "kernel.cu")
    _git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_a_clean_tree_is_its_head(repo: Path) -> None:
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_a_changed_tracked_file_marks_the_commit_dirty(repo: Path) -> None:
    (repo / "kernel.cu").write_text("two\\n")
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_an_untracked_file_leaves_it_clean(repo: Path) -> None:
    (repo / "notes.txt").write_text("scratch\\n")
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_the_variable_names_the_commit_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_BENCH_COMMIT", "5249934")
    assert git_commit(tmp_path) == "5249934"


def test_outside_a_checkout_without_the_variable_it_is_unknown(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_BENCH_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) == "unknown"
