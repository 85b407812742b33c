"""The images: pinned by locks that match pyproject.toml, dependencies installed before the source is copied, a
non-root user, no torch in the control plane's, and a build context without environments, history or results."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The lock script's own reading of pyproject.toml: which requirements each image installs.
LOCK_SCRIPT: dict[str, Any] = runpy.run_path(str(ROOT / ".ci" / "lock_images.py"))


def _lock(image: str) -> dict[str, Version]:
    lines = (ROOT / "docker" / f"{image}.lock.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), f"{image}: every line pins one version with =="
    return {name.lower().replace("_", "-"): Version(version) for name, version in pins}


@pytest.mark.parametrize("image", LOCK_SCRIPT["IMAGES"])
def test_each_lock_pins_every_requirement_of_its_image_within_pyprojects_range(image: str) -> None:
    lock = _lock(image)
    for requirement in map(Requirement, LOCK_SCRIPT["image_requirements"](image)):
        name = requirement.name.lower().replace("_", "-")
        assert name in lock, f"{image}: {name} is not locked; run python .ci/lock_images.py"
        assert requirement.specifier.contains(lock[name]), f"{image}: {name}=={lock[name]} outside {requirement}"


def test_no_torch_or_cuda_in_the_control_planes_lock() -> None:
    assert not [name for name in _lock("control-plane") if name in ("torch", "triton") or name.startswith(
        ("nvidia-", "cupy"))]


def test_the_gpu_workers_base_image_torch_meets_pyprojects_requirement() -> None:
    base = re.search(r"^FROM pytorch/pytorch:([\d.]+)-", (ROOT / "docker" / "gpu-worker.Dockerfile").read_text(),
                     re.MULTILINE)
    assert base is not None
    dependencies = map(Requirement, LOCK_SCRIPT["project"]()["dependencies"])
    torch = next(requirement for requirement in dependencies if requirement.name == "torch")
    assert torch.specifier.contains(base.group(1))


@pytest.mark.parametrize("image", LOCK_SCRIPT["IMAGES"])
def test_each_image_installs_its_lock_before_any_source_and_runs_as_a_user(image: str) -> None:
    lines = [line.split() for line in (ROOT / "docker" / f"{image}.Dockerfile").read_text().splitlines()
             if line and not line.startswith(("#", " "))]
    instructions = [(words[0], words[1:]) for words in lines]
    copies = [i for i, (op, args) in enumerate(instructions) if op == "COPY"]
    installs = [i for i, (op, args) in enumerate(instructions)
                if op == "RUN" and f"/tmp/{image}.lock.txt" in args and "--requirement" in args]
    assert instructions[copies[0]][1] == [f"docker/{image}.lock.txt", f"/tmp/{image}.lock.txt"]
    assert installs and installs[0] < min([*copies[1:], len(instructions)])
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] != ["root"]
    assert all(op != "USER" for op, _ in instructions[[op for op, _ in instructions].index("USER") + 1:])


def test_the_build_context_leaves_out_environments_history_builds_and_results() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for path in (".venv/", ".git/", "build/", "plots/", "**/__pycache__/", ".pytest_cache/", ".mypy_cache/",
                 "benchmarks/results/"):
        assert path in ignored, path


def test_every_package_directory_is_listed_so_the_images_install_it() -> None:
    """The images install the project non-editably (pip install .), which copies only the packages pyproject.toml
    lists; an editable install (the tests') finds every directory, so a missing entry shows only in an image."""
    pyproject = (ROOT / "pyproject.toml").read_text()  # read by pattern: tomllib is Python 3.11+
    package_dir = dict(re.findall(r'"(pagedserve[\w.]*)" = "([\w/]+)"', pyproject.split("package-dir = ")[1]
                                  .split("\n")[0]))
    packages_block = re.search(r"^packages = \[(.*?)\]", pyproject, re.MULTILINE | re.DOTALL)
    assert package_dir and packages_block
    listed = set(re.findall(r'"([\w.]+)"', packages_block.group(1)))
    on_disk = set()
    for package, directory in package_dir.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory).parts
            on_disk.add(".".join((package, *relative)))
    assert "pagedserve.kernels" in on_disk and on_disk <= listed, sorted(on_disk - listed)
