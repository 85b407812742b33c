"""install.sh picks the torch build for the machine: CPU-only without an NVIDIA GPU, CUDA and the gpu extra with one,
and keeps a torch already installed. Run against a recording stand-in for .venv's python and for nvidia-smi."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Records each call; `-c "import torch"` succeeds only when HAS_TORCH is set.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in -c*) [ -n "${HAS_TORCH:-}" ] || exit 1; echo 2.13.0;; esac
exit 0
"""


def _run_install(tmp_path: Path, *, has_gpu: bool, has_torch: bool, args: tuple[str, ...] = ()) -> list[str]:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "install.sh", checkout / "install.sh")
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if has_gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
        smi.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "HOME": str(tmp_path)}
    if has_torch:
        env["HAS_TORCH"] = "1"
    subprocess.run(["sh", str(checkout / "install.sh"), *args], env=env, check=True, capture_output=True)
    return [line for line in calls.read_text().splitlines() if not line.startswith("-c")]


def test_a_cpu_machine_gets_the_cpu_build(tmp_path: Path) -> None:
    assert _run_install(tmp_path, has_gpu=False, has_torch=False) == [
        f"-m pip install torch --index-url {CPU_INDEX}", "-m pip install -e .",
    ]


def test_a_gpu_machine_gets_pypis_cuda_build_and_the_gpu_extra(tmp_path: Path) -> None:
    assert _run_install(tmp_path, has_gpu=True, has_torch=False, args=("--dev",)) == [
        "-m pip install torch", "-m pip install -e .[dev,gpu]",
    ]


def test_an_installed_torch_is_kept(tmp_path: Path) -> None:
    assert _run_install(tmp_path, has_gpu=False, has_torch=True, args=("--dev",)) == ["-m pip install -e .[dev]"]


def test_the_readme_commands_go_through_the_script() -> None:
    readme = (ROOT / "README.md").read_text()

    assert "./install.sh && . .venv/bin/activate && pagedserve serve" in readme
    assert "./install.sh --dev && . .venv/bin/activate && python -m pytest -q" in readme
    assert os.access(ROOT / "install.sh", os.X_OK)
