"""Kernel profiles grouped into the parts of a decoder step: each kernel in the first group whose fragment its name
holds (fused kernels with the op they fuse into), the rest in "other", per engine step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.kernel_groups import group_of, grouped_us_per_step, main


@pytest.mark.parametrize(("kernel", "group"), [
    ("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", "GEMMs"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16", "GEMMs"),
    ("void decode_gemv<bfloat16_t, fp8_e4m3_t, 8, 2>(bfloat16_t const*, long long", "decode GEMV"),
    ("void decode_gemv_mma<bfloat16_t, fp8_e4m3_t, 12>(bfloat16_t const*, long long", "decode GEMV"),
    ("void fp8_gemv<bfloat16_t, 8, 2>(bfloat16_t const*, long long", "decode GEMV"),
    ("void silu_and_mul_fp8<bfloat16_t, 8, 2>(bfloat16_t const*, fp8_e4m3_t*", "SiLU-and-mul"),
    ("void silu_and_mul_fp8_staged<bfloat16_t, 8>(bfloat16_t const*, fp8_e4m3_t*", "SiLU-and-mul"),
    ("void add_rms_norm_fp8<bfloat16_t, 8, 1>(bfloat16_t const*, long long", "norms"),
    ("void quantize_fp8_per_row<bfloat16_t, 8, 1>(bfloat16_t const*", "per-token quantization"),
    ("void paged_decode<MmaState<bfloat16_t, 128, 4, 16, true, fp8_e4m3_t>", "decode attention"),
    ("memcpy128", "other"),
])
def test_each_kernel_falls_in_the_group_of_its_op(kernel: str, group: str) -> None:
    assert group_of(kernel) == group


def _profile(steps: int, kernels: dict[str, float]) -> dict[str, object]:
    return {"steps": steps, "model": "m", "metadata": {"commit": "abcdef0123"},
            "config": {"quantization": "fp8", "kv_cache_dtype": "fp8", "max_num_seqs": 64},
            "kernels": {name: {"calls": 1, "total_us": us} for name, us in kernels.items()}}


def test_groups_sum_per_step_and_add_up_to_every_kernel(tmp_path: Path) -> None:
    profile = _profile(4, {"nvjet_a": 400.0, "nvjet_b": 40.0, "void rms_norm<float, 4>": 8.0, "memset": 4.0})
    totals = grouped_us_per_step(profile)
    assert totals["GEMMs"] == 110.0 and totals["norms"] == 2.0 and totals["other"] == 1.0
    assert totals["decode attention"] == 0.0 and totals["all kernels"] == 113.0
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    assert main([str(path), str(path)]) == [totals, totals]


def test_the_device_busy_time_is_listed_where_a_profile_recorded_it(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    older = _profile(4, {"nvjet_a": 400.0})
    newer = {**_profile(4, {"nvjet_a": 400.0, "void rms_norm<float, 4>": 40.0}), "device_busy_us": 420.0}
    paths = []
    for name, profile in (("older", older), ("newer", newer)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(profile))
    older_totals, newer_totals = main([str(path) for path in paths])
    assert "device busy" not in older_totals
    assert newer_totals["device busy"] == 105.0 and newer_totals["all kernels"] == 110.0
    busy_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("device busy"))
    assert busy_line.split()[2:] == ["-", "105"]
