"""Compiling kernel instantiations to PTX with nvcc, without a GPU: what the source checks share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pagedserve.kernels import cache_ops

KERNEL_DIR = Path(cache_ops.__file__).resolve().parent


def instantiating_unit(source: str, names: Sequence[str]) -> str:
    """A translation unit taking each kernel's address, which instantiates it as CuPy's name expressions do."""
    addresses = "".join(f"  reinterpret_cast<const void*>(&{name}),\n" for name in names)
    return f'#include "{source}"\nextern const void* const kInstances[] = {{\n{addresses}}};\n'


def nvcc_ptx_command(unit: Path, ptx: Path, arch: str, defines: Sequence[str] = ()) -> list[str]:
    """nvcc compiling unit to PTX for arch with the device optimiser off (-O0): every instantiation parses,
    type-checks and lowers to PTX, in about a third of -O1's time; NVRTC compiles the optimised code in the GPU
    tests."""
    return ["nvcc", "--std=c++17", f"-I{KERNEL_DIR}", *defines, f"-arch={arch}", "-ptx", "-Xcicc", "-O0",
            "-o", str(ptx), str(unit)]


def entry_count(ptx: Path) -> int:
    """Kernels defined in a PTX file."""
    return sum(line.startswith((".visible .entry", ".entry")) for line in ptx.read_text().splitlines())
