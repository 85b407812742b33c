"""Regenerates the images' pinned requirements (docker/*.lock.txt) from pyproject.toml: pip resolves, without
installing, the dependencies each image needs for CPython 3.11 on manylinux x86_64 (the images' platform).

    python .ci/lock_images.py   # after changing a dependency in pyproject.toml; commit the lock files

The gateway image holds the dev extra's pinned smg alone. The other two leave torch out: the control plane never
imports it, and the GPU worker keeps the CUDA build of its base image (whose version tests/test_images.py checks
against pyproject's torch requirement, as it checks each lock against pyproject.toml).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("control-plane", "gpu-worker", "gateway")
NOT_LOCKED = "torch"
GATEWAY = "smg"  # the gateway image holds only the Shepherd Model Gateway, at the version the dev extra pins


def project() -> dict[str, Any]:
    """pyproject.toml's [project] table."""
    table: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return table


def image_requirements(image: str) -> list[str]:
    """What image installs: pyproject's dependencies (plus the gpu extra's for the GPU worker), torch left out; the
    gateway's pinned smg from the dev extra."""
    extras = project()["optional-dependencies"]
    if image == "gateway":
        return [line for line in extras["dev"] if Requirement(line).name == GATEWAY]
    lines = list(project()["dependencies"]) + (extras["gpu"] if image == "gpu-worker" else [])
    return [line for line in lines if Requirement(line).name != NOT_LOCKED]


def _resolve(requirements: list[str]) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
             # Wheels for glibc 2.17 to 2.31: the images' Debian and Ubuntu bases have 2.31 or later (llguidance's
             # wheels need it).
             str(report), "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
             "--platform", "manylinux_2_31_x86_64", "--only-binary=:all:",
             *requirements],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return sorted((item["metadata"]["name"].lower(), item["metadata"]["version"]) for item in installs)


def main() -> None:
    for image in IMAGES:
        pins = _resolve(image_requirements(image))
        header = (f"# The {image} image's dependencies, pinned for CPython 3.11 on manylinux x86_64.\n"
                  "# Generated from pyproject.toml by `python .ci/lock_images.py`; do not edit by hand.\n")
        (ROOT / "docker" / f"{image}.lock.txt").write_text(header + "".join(f"{n}=={v}\n" for n, v in pins))


if __name__ == "__main__":
    main()
