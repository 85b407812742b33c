"""Programmatic dependent launch: every kernel waits for the grid before it (CPU, on the sources), the launch
structures have cuda.h's layout (CPU), and on the GPU a kernel that reads its predecessor's output sees this replay's
values, not the last one's, inside a captured graph."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import dependent_launch
from pagedserve.kernels.dependent_launch import LaunchAttribute, LaunchConfig
from pagedserve.kernels.fp8 import quantize_per_row
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU

KERNEL_DIR = Path(dependent_launch.__file__).resolve().parent
WAITS = ("begin_dependent_grid();", "wait_for_prior_grid();")


def _kernel_bodies() -> dict[str, str]:
    """Each __global__ function of kernels/*.cu by name, with its body (up to the brace that closes it)."""
    bodies: dict[str, str] = {}
    for path in sorted(KERNEL_DIR.glob("*.cu")):
        text = path.read_text()
        for match in re.finditer(r"__global__\b", text):
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


def test_launch_structures_have_the_driver_layout() -> None:
    # cuda.h: CUlaunchAttribute is the id padded to 8 bytes and a 64-byte union; CUlaunchConfig is seven unsigned
    # ints, the stream handle, the attribute pointer and their count.
    assert ctypes.sizeof(LaunchAttribute) == 72 and LaunchAttribute.value.offset == 8
    assert (LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert ctypes.sizeof(LaunchConfig) == 56


class TestCapturedChain:
    pytestmark = NEEDS_FP8_GPU

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
        gate_up = torch.randn(num_rows, 2 * in_features, device=device, generator=gen).to(torch.bfloat16)
        ops.fp8_gemv(ops.silu_and_mul(gate_up), weight, scale)  # compiles both before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.fp8_gemv(ops.silu_and_mul(gate_up), weight, scale)
        for _ in range(20):
            # New inputs each replay: a GEMV that read the activation before silu_and_mul had written it would
            # return the product of the replay before.
            gate_up.copy_(torch.randn(gate_up.shape, device=device, generator=gen))
            graph.replay()
            expected = reference.fp8_gemv(reference.silu_and_mul(gate_up), weight, scale)
            torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2,
                                       atol=2e-2 * expected.float().abs().mean().item())
