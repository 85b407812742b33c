"""The norms and SiLU-and-mul that quantize their output for the FP8 layer reading it (GPU, compute capability 8.9 or
later): bit for bit the plain kernel followed by quantize_fp8_per_row, e4m3 bytes, scales and residual stream alike.
The plain kernels and quantize_fp8_per_row are held to the torch reference in test_layer_kernels.py and
test_fp8_row_quantization.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU
from tests.kernels.test_fp8_row_quantization import _assert_same

pytestmark = NEEDS_FP8_GPU

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = 1e-5


def _rows(num_rows: int, num_cols: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> Tensor:
    """Gaussian rows of magnitudes 1e-2 .. 1e2 times scale (each row its own quantization scale)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    magnitudes = torch.logspace(-2, 2, num_rows, device="cuda")[:, None]
    return (torch.randn(num_rows, num_cols, generator=gen, device="cuda") * magnitudes * scale).to(dtype)


def _weight(hidden: int, dtype: torch.dtype, seed: int) -> Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (1 + 0.5 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)


@pytest.mark.usefixtures("poisoned_outputs")
class TestFusedEqualsPlainThenQuantize:
    # 5120 float32 and 12288 16-bit values are 1,280 and 1,536 vectors: rows of two vectors a thread, whose sums of
    # squares must still be formed as the plain norm's 1,024 threads form them.
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [13, 64, 2048, 4096, 5120, 12288])
    @pytest.mark.parametrize("num_rows", [1, 7, 300])
    def test_rms_norm_fp8(self, ops: KernelOps, dtype: torch.dtype, hidden: int, num_rows: int) -> None:
        x, weight = _rows(num_rows, hidden, dtype, seed=hidden + num_rows), _weight(hidden, dtype, seed=1)
        _assert_same(ops.rms_norm_fp8(x, weight, EPS), ops.quantize_fp8_per_row(ops.rms_norm(x, weight, EPS)))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("offset", [0, 1])  # 1: rows off the vector alignment, so one element per load
    def test_rms_norm_fp8_of_strided_rows(self, ops: KernelOps, dtype: torch.dtype, offset: int) -> None:
        x = _rows(37, 2048 + 24, dtype, seed=offset)[:, offset : offset + 2048]
        weight = _weight(2048, dtype, seed=2)
        _assert_same(ops.rms_norm_fp8(x, weight, EPS), ops.quantize_fp8_per_row(ops.rms_norm(x, weight, EPS)))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("hidden", [13, 2048, 4096, 5120, 12288])
    @pytest.mark.parametrize("num_rows", [1, 7, 300])
    def test_add_rms_norm_fp8_adds_into_the_residual_as_add_rms_norm(
        self, ops: KernelOps, dtype: torch.dtype, hidden: int, num_rows: int,
    ) -> None:
        x, weight = _rows(num_rows, hidden, dtype, seed=3), _weight(hidden, dtype, seed=4)
        residual = _rows(num_rows, hidden, dtype, seed=5, scale=8.0)
        expected_residual = residual.clone()
        expected = ops.quantize_fp8_per_row(ops.add_rms_norm(x, expected_residual, weight, EPS))
        _assert_same(ops.add_rms_norm_fp8(x, residual, weight, EPS), expected)
        assert torch.equal(residual, expected_residual)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("size", [13, 64, 2048, 8192, 14336, 53248])  # 53248: 8 vectors a thread
    @pytest.mark.parametrize("num_rows", [1, 7, 300])
    def test_silu_and_mul_fp8(self, ops: KernelOps, dtype: torch.dtype, size: int, num_rows: int) -> None:
        gate_up = _rows(num_rows, 2 * size, dtype, seed=size + num_rows, scale=0.1)
        _assert_same(ops.silu_and_mul_fp8(gate_up), ops.quantize_fp8_per_row(ops.silu_and_mul(gate_up)))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_silu_and_mul_fp8_rows_staged_and_in_registers_agree(self, ops: KernelOps, dtype: torch.dtype) -> None:
        """Rows of over 1,024 vectors, more of them than SMs, are staged in shared memory; 16 at a time are held in
        registers."""
        num_rows = 300
        assert torch.cuda.get_device_properties(0).multi_processor_count < num_rows  # so that the 300 are staged
        gate_up = _rows(num_rows, 2 * 14336, dtype, seed=16, scale=0.1)
        parts = [ops.silu_and_mul_fp8(gate_up[start:start + 16]) for start in range(0, num_rows, 16)]
        expected = (torch.cat([values for values, _ in parts]), torch.cat([scales for _, scales in parts]))
        _assert_same(ops.silu_and_mul_fp8(gate_up), expected)

    def test_silu_and_mul_fp8_is_the_torch_reference(self, ops: KernelOps) -> None:
        gate_up = _rows(64, 2 * 4096, torch.bfloat16, seed=6, scale=0.1)
        _assert_same(ops.silu_and_mul_fp8(gate_up), TorchReferenceOps().silu_and_mul_fp8(gate_up.cpu()))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_zero_and_nan_rows(self, ops: KernelOps, dtype: torch.dtype) -> None:
        """A zero row takes the clamped scale and quantizes to zeros; a NaN makes its whole row and scale NaN, as
        the separate quantization does; the other rows are untouched by either."""
        x, weight = _rows(4, 2048, dtype, seed=7), _weight(2048, dtype, seed=8)
        x[1] = 0
        x[2, 100] = float("nan")
        gate_up = torch.cat((x, x), dim=1)
        _assert_nan_rows_same(ops.rms_norm_fp8(x, weight, EPS), ops.quantize_fp8_per_row(ops.rms_norm(x, weight, EPS)))
        _assert_nan_rows_same(ops.silu_and_mul_fp8(gate_up), ops.quantize_fp8_per_row(ops.silu_and_mul(gate_up)))
        residual, expected_residual = torch.zeros_like(x), torch.zeros_like(x)
        _assert_nan_rows_same(ops.add_rms_norm_fp8(x, residual, weight, EPS),
                              ops.quantize_fp8_per_row(ops.add_rms_norm(x, expected_residual, weight, EPS)))
        torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0, equal_nan=True)
        quantized, scale = ops.silu_and_mul_fp8(gate_up)
        assert scale[2].isnan().item() and quantized[2].float().isnan().all()
        assert not quantized[1].float().any()

    def test_replayed_from_a_cuda_graph(self, ops: KernelOps) -> None:
        x, weight = _rows(64, 2048, torch.bfloat16, seed=9), _weight(2048, torch.bfloat16, seed=10)
        residual, gate_up = _rows(64, 2048, torch.bfloat16, seed=11), _rows(64, 2 * 8192, torch.bfloat16, seed=12)

        def fused() -> list[tuple[Tensor, Tensor]]:
            return [ops.rms_norm_fp8(x, weight, EPS), ops.add_rms_norm_fp8(x, residual, weight, EPS),
                    ops.silu_and_mul_fp8(gate_up)]

        fused()  # compiles before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outputs = fused()
        x.copy_(_rows(64, 2048, torch.bfloat16, seed=13))  # new inputs, written in place
        gate_up.copy_(_rows(64, 2 * 8192, torch.bfloat16, seed=14))
        expected_residual = residual.clone()
        expected = [ops.quantize_fp8_per_row(ops.rms_norm(x, weight, EPS)),
                    ops.quantize_fp8_per_row(ops.add_rms_norm(x, expected_residual, weight, EPS)),
                    ops.quantize_fp8_per_row(ops.silu_and_mul(gate_up))]
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outputs, expected, strict=True):
            _assert_same(got, want)
        assert torch.equal(residual, expected_residual)

    def test_no_rows(self, ops: KernelOps) -> None:
        x, weight = torch.ones(0, 64, dtype=torch.bfloat16, device="cuda"), _weight(64, torch.bfloat16, seed=15)
        for quantized, scale in (ops.rms_norm_fp8(x, weight, EPS), ops.add_rms_norm_fp8(x, x.clone(), weight, EPS),
                                 ops.silu_and_mul_fp8(torch.ones(0, 128, dtype=torch.bfloat16, device="cuda"))):
            assert quantized.shape == (0, 64) and scale.shape == (0, 1)


def _assert_nan_rows_same(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> None:
    """The same e4m3 bytes and scales, NaN where the expected scale is NaN (NaN never compares equal)."""
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[0].view(torch.uint8), expected[0].view(torch.uint8))
