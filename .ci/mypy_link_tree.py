"""Builds build/mypy/pagedserve: a link tree of pyproject's [tool.setuptools] package-dir, which mypy cannot map
by itself (the import name pagedserve has no folder of that name; its sub-packages live in several folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = ROOT / "build" / "mypy"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "pagedserve").mkdir(parents=True)
    for entry in (ROOT / package_dir["pagedserve"]).iterdir():
        (tree / "pagedserve" / entry.name).symlink_to(entry.resolve())
    for package, source in package_dir.items():
        if package != "pagedserve":
            (tree.joinpath(*package.split("."))).symlink_to((ROOT / source).resolve())


if __name__ == "__main__":
    main()
