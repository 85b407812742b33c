"""Every CUDA source compiles to PTX for sm_80 and sm_90 with the instantiations its launcher can ask for there.

By default (the CI suite) a representative subset compiles: instantiations grouped by their template with every
number masked (so each kernel x state type x scalar type x cache type (FP8 or not) is a group), the first and last
of each group in sorted order. `pytest --all-kernel-variants` compiles every one (minutes, since the FP8 variants).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pagedserve.kernels import cache_ops, decode_gemv, layer_kernels, paged_decode, paged_prefill, token_masks
from pagedserve.kernels.dependent_launch import COMPILE_DEFINE
from tests.kernels.ptx import KERNEL_DIR, entry_count, instantiating_unit, nvcc_ptx_command

ARCHS = ("compute_80", "compute_90")
HAS_TMA = {"compute_80": False, "compute_90": True}  # the tensor memory accelerator
# ModuleCache's defines there: from compute capability 9.0 every kernel is built for dependent launches.
DEFINES: dict[str, tuple[str, ...]] = {"compute_80": (), "compute_90": (COMPILE_DEFINE,)}
NAME_EXPRESSIONS = {
    "cache_ops.cu": dict.fromkeys(ARCHS, cache_ops.known_name_expressions()),
    "decode_gemv.cu": dict.fromkeys(ARCHS, decode_gemv.known_name_expressions()),
    "layer_kernels.cu": dict.fromkeys(ARCHS, layer_kernels.known_name_expressions()),
    "paged_decode.cu": {arch: paged_decode.known_name_expressions(HAS_TMA[arch]) for arch in ARCHS},
    "paged_prefill.cu": dict.fromkeys(ARCHS, paged_prefill.known_name_expressions()),
    "token_masks.cu": dict.fromkeys(ARCHS, token_masks.known_name_expressions()),
}


def _representatives(names: list[str]) -> list[str]:
    """The first and last name of each group of names that differ only in numbers."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(re.sub(r"\d+", "N", name), []).append(name)
    return sorted({name for group in groups.values() for name in (group[0], group[-1])})


def test_representatives_keep_each_template_and_type_combination() -> None:
    names = ["k<float, 8, fp8>", "k<float, 16, fp8>", "k<float, 32, fp8>", "k<half, 8, fp8>", "r<float, 8>"]
    assert _representatives(names) == ["k<float, 16, fp8>", "k<float, 8, fp8>", "k<half, 8, fp8>", "r<float, 8>"]


def test_every_cuda_source_has_listed_instantiations() -> None:
    assert sorted(NAME_EXPRESSIONS) == sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(NAME_EXPRESSIONS))
def test_source_compiles_to_ptx_for_ampere_and_hopper(source: str, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    is_exhaustive = request.config.getoption("--all-kernel-variants")
    names = {arch: listed if is_exhaustive else _representatives(listed)
             for arch, listed in NAME_EXPRESSIONS[source].items()}
    for arch in ARCHS:
        (tmp_path / f"{arch}_{source}").write_text(instantiating_unit(source, names[arch]))
    # Both architectures compile concurrently.
    runs = {
        arch: subprocess.Popen(
            nvcc_ptx_command(tmp_path / f"{arch}_{source}", tmp_path / f"{arch}.ptx", arch, DEFINES[arch]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for arch in ARCHS
    }
    for arch, run in runs.items():
        output, _ = run.communicate()
        assert run.returncode == 0, f"{source} for {arch}:\n{output}"
        assert "warning" not in output.lower(), f"{source} for {arch}:\n{output}"
        assert entry_count(tmp_path / f"{arch}.ptx") == len(names[arch])
