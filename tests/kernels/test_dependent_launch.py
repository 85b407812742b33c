"""Programmatic dependent launch: every kernel waits for the grid before it (CPU, on the sources), the launch
structures have cuda.h's layout (CPU), and on the GPU a kernel that reads its predecessor's output sees this replay's
values, not the last one's, inside a captured graph."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pagedserve.kernels.dependent_launch import COMPILE_DEFINE, MIN_COMPUTE_CAPABILITY, LaunchAttribute, LaunchConfig
from pagedserve.kernels.fp8 import quantize_per_row
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU
from tests.kernels.ptx import KERNEL_DIR

WAITS = ("begin_dependent_grid();", "wait_for_prior_grid();")
# What a kernel may not touch before its wait: the activations it reads and what it writes (decode_gemv's names).
BEFORE_WAIT_FORBIDDEN = ("x", "x_row_stride", "out", "scales", "bias", "load_x", "load_mma_x")


def _code(text: str) -> str:
    """text without its // comments."""
    return re.sub(r"//[^\n]*", "", text)


def _kernel_bodies() -> dict[str, str]:
    """Each __global__ function of kernels/*.cu by name, with its body (up to the brace that closes it)."""
    bodies: dict[str, str] = {}
    for path in sorted([*KERNEL_DIR.glob("*.cu"), *KERNEL_DIR.glob("*.cuh")]):
        text = path.read_text()
        for match in re.finditer(r"^\s*__global__\b", text, re.MULTILINE):
            open_brace = text.index("{", match.end())
            name = re.findall(r"(\w+)\s*\(", text[match.end():open_brace])[-1]
            depth, end = 0, open_brace
            for end in range(open_brace, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    break
            bodies[f"{path.name}:{name}"] = text[open_brace:end + 1]
    return bodies


def test_every_kernel_waits_for_the_grid_before_it() -> None:
    bodies = _kernel_bodies()
    assert len(bodies) >= 19, sorted(bodies)
    missing = [name for name, body in bodies.items() if not any(wait in body for wait in WAITS)]
    assert not missing, f"launched as dependent launches, these never wait for the kernel before them: {missing}"


def test_kernels_that_begin_with_the_wait_do_nothing_before_it() -> None:
    for name, body in _kernel_bodies().items():
        if "begin_dependent_grid();" in body:
            first_statement = body[1:].strip().split("\n", 1)[0]
            assert first_statement == "begin_dependent_grid();", (name, first_statement)


def test_a_kernel_that_loads_before_its_wait_loads_only_weights() -> None:
    early = {name: _code(body).split("wait_for_prior_grid();")[0] for name, body in _kernel_bodies().items()
             if "begin_dependent_grid();" not in body}
    assert list(early) == ["decode_gemv.cu:decode_gemv", "decode_gemv.cu:decode_gemv_mma"]
    for name, code in early.items():
        assert "load_weight_batch" in code or "load_mma_weights" in code, name
        touched = [word for word in BEFORE_WAIT_FORBIDDEN if re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", code)]
        assert not touched, f"{name} touches {touched} before it waits for the kernel before it"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_built_for_dependent_launch_refuse_an_architecture_without_the_wait(arch: str,
                                                                                   tmp_path: Path) -> None:
    completed = subprocess.run(
        ["nvcc", "--std=c++17", f"-I{KERNEL_DIR}", f"-arch={arch}", "-ptx", COMPILE_DEFINE,
         str(KERNEL_DIR / "cache_ops.cu"), "-o", str(tmp_path / "cache_ops.ptx")],
        capture_output=True, text=True, check=False)
    if arch == "compute_80":
        assert completed.returncode != 0 and "griddepcontrol" in completed.stderr, completed.stderr
    else:
        assert completed.returncode == 0, completed.stderr
        assert "griddepcontrol.wait" in (tmp_path / "cache_ops.ptx").read_text()


def test_launch_structures_have_the_driver_layout() -> None:
    # cuda.h: CUlaunchAttribute is the id padded to 8 bytes and a 64-byte union; CUlaunchConfig is seven unsigned
    # ints, the stream handle, the attribute pointer and their count.
    assert ctypes.sizeof(LaunchAttribute) == 72 and LaunchAttribute.value.offset == 8
    assert (LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert ctypes.sizeof(LaunchConfig) == 56


class TestCapturedChain:
    pytestmark = NEEDS_FP8_GPU

    def test_launches_are_dependent_from_compute_capability_9(self) -> None:
        from pagedserve.kernels.module_cache import ModuleCache

        device = torch.device("cuda")
        expected = torch.cuda.get_device_capability(device) >= MIN_COMPUTE_CAPABILITY
        assert ModuleCache(device).dependent_launches == expected

    @pytest.mark.parametrize("in_features", [2048, 14336])
    @pytest.mark.parametrize("num_rows", [1, 4])
    def test_a_dependent_kernel_reads_this_replays_output_of_the_one_before(self, in_features: int,
                                                                           num_rows: int) -> None:
        from pagedserve.kernels.ops import get_kernel_ops

        device = torch.device("cuda")
        ops, reference = get_kernel_ops(device), TorchReferenceOps()
        gen = torch.Generator(device=device).manual_seed(in_features + num_rows)
        weight, scale = quantize_per_row(torch.randn(1024, in_features, device=device, generator=gen))
        scale = scale.squeeze(1)
        # silu_and_mul runs over 2,048 rows and the GEMV reads its last ones: the kernel before takes tens of
        # microseconds, long enough for a GEMV that did not wait to read the rows before they are written.
        gate_up = torch.randn(2048, 2 * in_features, device=device, generator=gen).to(torch.bfloat16)
        ops.fp8_gemv(ops.silu_and_mul(gate_up)[-num_rows:], weight, scale)  # compiles both before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.fp8_gemv(ops.silu_and_mul(gate_up)[-num_rows:], weight, scale)
        for _ in range(20):
            # New inputs each replay: a GEMV that read the activation before silu_and_mul had written it would
            # return the product of the replay before.
            gate_up.copy_(torch.randn(gate_up.shape, device=device, generator=gen))
            graph.replay()
            expected = reference.fp8_gemv(reference.silu_and_mul(gate_up[-num_rows:]), weight, scale)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2,
                                       atol=2e-2 * expected.float().abs().mean().item())
