"""The prompt-attention tile sweep (CPU): which tile shapes it compares, and that each one compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.kernel_prefill_tiles import CANDIDATES, tile_shapes
from pagedserve.kernels import paged_prefill
from pagedserve.kernels.dependent_launch import COMPILE_DEFINE
from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.paged_prefill import PrefillTiles, narrow_tiles, shared_bytes, wide_tiles
from tests.kernels.ptx import entry_count, instantiating_unit, nvcc_ptx_command

H100_SHARED_BYTES = 227 * 1024


@pytest.mark.parametrize("head_dim", sorted(CANDIDATES))
def test_the_wide_shape_comes_first_then_the_candidates_once_each_the_narrow_one_among_them(head_dim: int) -> None:
    shapes = tile_shapes(head_dim, torch.bfloat16, H100_SHARED_BYTES)
    assert shapes[0] == wide_tiles(head_dim)
    assert len(set(shapes)) == len(shapes) == 1 + len(set(CANDIDATES[head_dim]) - {wide_tiles(head_dim)})
    assert narrow_tiles(head_dim) in shapes


def test_shapes_whose_shared_memory_exceeds_the_devices_are_left_out() -> None:
    limit = shared_bytes(torch.bfloat16, 64, wide_tiles(64))
    shapes = tile_shapes(64, torch.bfloat16, limit)
    assert wide_tiles(64) in shapes and PrefillTiles(1, 128) not in shapes
    assert all(shared_bytes(torch.bfloat16, 64, t) <= limit for t in shapes)
    # An FP8 cache stages e4m3 rows and widens one tile: its own sizes decide.
    assert all(shared_bytes(FP8_DTYPE, 64, t) <= limit for t in tile_shapes(64, FP8_DTYPE, limit))


def test_a_tile_shape_names_its_threads_in_the_kernel() -> None:
    name = paged_prefill.kernel_name(torch.bfloat16, torch.bfloat16, 64, PrefillTiles(1, 64, warps=8))
    assert name == "paged_prefill<bfloat16_t, 64, 1, 64, 256>"
    assert PrefillTiles(1, 64, warps=8).block_m == 128 == wide_tiles(64).block_m


def test_a_register_cap_names_the_cache_type_before_it_and_the_default_names_neither() -> None:
    capped = PrefillTiles(2, 64, min_ctas=3)
    assert paged_prefill.kernel_name(torch.bfloat16, torch.bfloat16, 64, capped) == (
        "paged_prefill<bfloat16_t, 64, 2, 64, 128, bfloat16_t, 3>")
    assert paged_prefill.kernel_name(torch.bfloat16, FP8_DTYPE, 64, capped) == (
        "paged_prefill<bfloat16_t, 64, 2, 64, 128, fp8_e4m3_t, 3>")
    assert paged_prefill.kernel_name(torch.float16, torch.float16, 64, wide_tiles(64)) == (
        "paged_prefill<half_t, 64, 2, 64, 128>")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_every_candidate_compiles_for_hopper_with_both_cache_types(tmp_path: Path) -> None:
    names = [paged_prefill.kernel_name(torch.bfloat16, cache, head_dim, tiles)
             for head_dim, shapes in CANDIDATES.items() for tiles in shapes for cache in (torch.bfloat16, FP8_DTYPE)]
    unit, ptx = tmp_path / "unit.cu", tmp_path / "unit.ptx"
    unit.write_text(instantiating_unit("paged_prefill.cu", names))
    run = subprocess.run(nvcc_ptx_command(unit, ptx, "compute_90", (COMPILE_DEFINE,)), capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
    assert entry_count(ptx) == len(names)
