"""Every CUDA source compiles to PTX for sm_80 and sm_90 with each instantiation its launcher can ask for there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pagedserve.kernels import cache_ops, layer_kernels, paged_decode, paged_prefill

KERNEL_DIR = Path(cache_ops.__file__).resolve().parent
ARCHS = ("compute_80", "compute_90")
HAS_TMA = {"compute_80": False, "compute_90": True}  # the tensor memory accelerator
NAME_EXPRESSIONS = {
    "cache_ops.cu": dict.fromkeys(ARCHS, cache_ops.known_name_expressions()),
    "layer_kernels.cu": dict.fromkeys(ARCHS, layer_kernels.known_name_expressions()),
    "paged_decode.cu": {arch: paged_decode.known_name_expressions(HAS_TMA[arch]) for arch in ARCHS},
    "paged_prefill.cu": dict.fromkeys(ARCHS, paged_prefill.known_name_expressions()),
}


def _instantiating_unit(source: str, names: list[str]) -> str:
    """A translation unit taking each kernel's address, which instantiates it as CuPy's name expressions do."""
    addresses = "".join(f"  reinterpret_cast<const void*>(&{name}),\n" for name in names)
    return f'#include "{source}"\nextern const void* const kInstances[] = {{\n{addresses}}};\n'


def _entry_count(ptx: Path) -> int:
    return sum(line.startswith(".visible .entry") or line.startswith(".entry") for line in ptx.read_text().splitlines())


def test_every_cuda_source_has_listed_instantiations() -> None:
    assert sorted(NAME_EXPRESSIONS) == sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(NAME_EXPRESSIONS))
def test_source_compiles_to_ptx_for_ampere_and_hopper(source: str, tmp_path: Path) -> None:
    names = NAME_EXPRESSIONS[source]
    for arch in ARCHS:
        (tmp_path / f"{arch}_{source}").write_text(_instantiating_unit(source, names[arch]))
    # Both architectures compile concurrently. The device optimiser is off (-O0): this checks that every
    # instantiation parses, type-checks and lowers to PTX, in about a third of -O1's time; optimised code is
    # exercised by NVRTC in the GPU tests.
    runs = {
        arch: subprocess.Popen(
            ["nvcc", "--std=c++17", f"-I{KERNEL_DIR}", f"-arch={arch}", "-ptx", "-Xcicc", "-O0",
             "-o", str(tmp_path / f"{arch}.ptx"), str(tmp_path / f"{arch}_{source}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for arch in ARCHS
    }
    for arch, run in runs.items():
        output, _ = run.communicate()
        assert run.returncode == 0, f"{source} for {arch}:\n{output}"
        assert "warning" not in output.lower(), f"{source} for {arch}:\n{output}"
        assert _entry_count(tmp_path / f"{arch}.ptx") == len(names[arch])
