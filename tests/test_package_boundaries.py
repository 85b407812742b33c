"""The planes share only the contract, the generated protocol and the runtime helpers; the contract depends on
nothing of ours but the generated protocol; the control plane never needs torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> the pagedserve packages and third-party modules it must never import.
FORBIDDEN = {
    "control_plane": ("pagedserve.gpu_worker", "pagedserve.kernels", "pagedserve.clients", "torch", "cupy"),
    "gpu_worker": ("pagedserve.control_plane", "pagedserve.clients"),
    "kernels": ("pagedserve.control_plane", "pagedserve.gpu_worker", "pagedserve.clients"),
    "contract": (
        "pagedserve.control_plane", "pagedserve.gpu_worker", "pagedserve.kernels", "pagedserve.clients",
        "pagedserve.runtime", "torch", "grpc", "cupy",
    ),
    "runtime": ("torch",),
}
PLANES = ("pagedserve.control_plane", "pagedserve.gpu_worker", "pagedserve.kernels", "pagedserve.clients")


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_package_imports_stay_on_their_side_of_the_boundary(folder: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module in sorted(_imported_modules(path))
        if any(_is_within(module, forbidden) for forbidden in FORBIDDEN[folder])
    ]
    assert violations == []


def test_only_the_pagedserve_command_reaches_from_the_runtime_into_the_planes() -> None:
    reaching = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "runtime").rglob("*.py")
        if any(_is_within(m, plane) for m in _imported_modules(path) for plane in PLANES)
    )
    assert reaching == ["runtime/cli.py"]
