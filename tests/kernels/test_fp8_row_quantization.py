"""Per-row (per-token) FP8 quantization, an FP8 linear layer's input: the torch reference against the same math in
NumPy float32 (CPU), and the kernel against the reference bit for bit (GPU, compute capability 8.9 or later)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear
from pagedserve.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_ROW_SCALE_NUMERATOR, quantize_per_row
from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU

REFERENCE = TorchReferenceOps()
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A row whose amax is FP8_MAX has scale 1 exactly. 1.0625 and 1.1875 lie halfway between e4m3 neighbours (steps of
# 0.125 there) and round to the even one: 1.0 and 1.25.
TIES_ROW = (FP8_MAX, 1.0625, 1.1875, -1.0625, -1.1875)
TIES_ROUNDED = (FP8_MAX, 1.0, 1.25, -1.0, -1.25)


def _rows(num_rows: int, num_cols: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> Tensor:
    """Gaussian rows whose magnitudes span 1e-3 .. 1e3 (so every row has its own scale and some values fall in
    e4m3's subnormals), with the middle row all zero when there are several."""
    gen = torch.Generator(device=device).manual_seed(seed)
    magnitudes = torch.logspace(-3, 3, num_rows, device=device)[:, None]
    x = torch.randn(num_rows, num_cols, generator=gen, device=device) * magnitudes
    if num_rows > 1:
        x[num_rows // 2] = 0
    return x.to(dtype)


def _special_rows(num_cols: int, dtype: torch.dtype, device: str = "cpu") -> Tensor:
    """Row 0: zeros; 1: TIES_ROW, then zeros; 2: a single -3; 3: values of 1e-20 (the scale clamps: all round to
    zero); 4: a wide range, 1e-7 .. 1e2 with alternating signs."""
    x = torch.zeros(5, num_cols)
    x[1, : len(TIES_ROW)] = torch.tensor(TIES_ROW)
    x[2, num_cols // 3] = -3.0
    x[3] = 1e-20
    x[4] = torch.logspace(-7, 2, num_cols) * torch.tensor([1.0, -1.0]).repeat(num_cols // 2)
    return x.to(device=device, dtype=dtype)


def _numpy_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """The same math in NumPy float32: scale = max(amax, 1e-12) / 448, q = clip(x * (1 / scale)), rounded to e4m3 by
    torch's conversion."""
    x32 = x.float().cpu().numpy()
    amax = np.abs(x32).max(axis=1, keepdims=True)
    scale = np.maximum(amax, np.float32(MIN_ROW_SCALE_NUMERATOR)) / np.float32(FP8_MAX)
    quantized = np.clip(x32 * (np.float32(1) / scale), np.float32(-FP8_MAX), np.float32(FP8_MAX))
    return torch.from_numpy(quantized).to(FP8_DTYPE), torch.from_numpy(scale)


def _assert_same(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> None:
    """The same e4m3 bytes and the same float32 scales, bit for bit."""
    (quantized, scale), (expected_quantized, expected_scale) = got, expected
    assert quantized.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert quantized.shape == expected_quantized.shape and scale.shape == expected_scale.shape
    assert torch.equal(quantized.cpu().view(torch.uint8), expected_quantized.cpu().view(torch.uint8))
    assert torch.equal(scale.cpu(), expected_scale.cpu())


# -- the torch reference (CPU) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_float32_math_of_numpy(dtype: torch.dtype) -> None:
    x = torch.cat((_rows(37, 300, dtype, seed=1), _special_rows(300, dtype)))
    for quantize in (quantize_per_row, REFERENCE.quantize_fp8_per_row):
        _assert_same(quantize(x), _numpy_quantize(x))
        _assert_same(quantize(x[:, 7:207]), _numpy_quantize(x[:, 7:207]))  # strided rows


def test_the_product_by_the_inverse_is_the_division_but_for_a_few_neighbouring_values() -> None:
    x = _rows(1024, 4096, torch.bfloat16, seed=3).float()
    quantized, scale = quantize_per_row(x)
    divided = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    differs = quantized.view(torch.uint8) != divided.view(torch.uint8)
    assert 0 < differs.float().mean().item() < 1e-3  # about 5 in 10,000 values
    steps = quantized.view(torch.uint8)[differs].int() - divided.view(torch.uint8)[differs].int()
    assert steps.abs().eq(1).all()  # each on the neighbouring e4m3 value, of the same sign


def test_reference_rounds_ties_to_even_and_keeps_each_rows_largest_value() -> None:
    x = _special_rows(64, torch.bfloat16)
    quantized, scale = REFERENCE.quantize_fp8_per_row(x)
    assert torch.equal(quantized[1, : len(TIES_ROW)].float(), torch.tensor(TIES_ROUNDED))
    assert scale[1].item() == 1.0
    assert quantized[2, 64 // 3].item() == -FP8_MAX and scale[2].item() == np.float32(3.0) / np.float32(FP8_MAX)
    assert not quantized[[0, 3]].float().any()  # an all-zero row, and one far below the clamp
    assert (scale[[0, 3]] == np.float32(MIN_ROW_SCALE_NUMERATOR) / np.float32(FP8_MAX)).all()
    assert quantized.float().abs().amax(dim=1)[[1, 2, 4]].eq(FP8_MAX).all()


# -- the kernel against the reference (GPU) ------------------------------------------------------------------------

def _on_both(ops: KernelOps, x: Tensor) -> None:
    """The kernel, the reference on the GPU and the reference on the CPU give the same bytes and scales."""
    expected = REFERENCE.quantize_fp8_per_row(x.cpu())
    got = ops.quantize_fp8_per_row(x)
    assert got[0].is_contiguous() and got[0].device == x.device
    _assert_same(got, expected)
    _assert_same(REFERENCE.quantize_fp8_per_row(x), expected)  # on CUDA too: its divisions are true divisions


@pytest.mark.usefixtures("poisoned_outputs")
class TestKernelMatchesReference:
    pytestmark = NEEDS_FP8_GPU

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("num_cols", [2048, 4096, 14336])
    @pytest.mark.parametrize("num_rows", [1, 7, 64, 300])
    def test_random_rows(self, ops: KernelOps, dtype: torch.dtype, num_cols: int, num_rows: int) -> None:
        _on_both(ops, _rows(num_rows, num_cols, dtype, seed=num_rows + num_cols, device="cuda"))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_special_rows(self, ops: KernelOps, dtype: torch.dtype) -> None:
        _on_both(ops, _special_rows(2048, dtype, device="cuda"))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_a_nan_makes_its_whole_row_nan(self, ops: KernelOps, dtype: torch.dtype) -> None:
        x = _rows(3, 2048, dtype, seed=6, device="cuda")
        x[0, 1000] = float("nan")
        for quantized, scale in (ops.quantize_fp8_per_row(x), REFERENCE.quantize_fp8_per_row(x)):
            assert scale[0].isnan().item() and quantized[0].float().isnan().all()  # as torch's amax propagates it
            _assert_same((quantized[1:], scale[1:]), REFERENCE.quantize_fp8_per_row(x[1:].cpu()))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("offset", [0, 1, 8])  # 1: rows off the vector alignment, so one element per load
    @pytest.mark.parametrize("num_cols", [4096, 20000])  # 20000 elements one at a time: 20 a thread, in registers
    def test_strided_rows(self, ops: KernelOps, dtype: torch.dtype, offset: int, num_cols: int) -> None:
        rows = _rows(37, num_cols + 24, dtype, seed=offset, device="cuda")
        _on_both(ops, rows[:, offset : offset + num_cols])

    def test_replayed_from_a_cuda_graph(self, ops: KernelOps) -> None:
        x = _rows(7, 4096, torch.bfloat16, seed=3, device="cuda")
        ops.quantize_fp8_per_row(x)  # compiles before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            outputs = ops.quantize_fp8_per_row(x)
        x.copy_(_rows(7, 4096, torch.bfloat16, seed=4, device="cuda"))  # new inputs, written in place
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(outputs, REFERENCE.quantize_fp8_per_row(x.cpu()))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_fp8_linear_quantizes_its_input_with_the_kernel(self, ops: KernelOps, dtype: torch.dtype) -> None:
        gen = torch.Generator(device="cuda").manual_seed(5)
        weight = torch.randn(512, 1024, generator=gen, device="cuda").to(dtype)
        bias = torch.randn(512, generator=gen, device="cuda").to(dtype)
        x = torch.randn(64, 1024, generator=gen, device="cuda").to(dtype)  # beyond the GEMV's rows: _scaled_mm
        layer, reference_layer = Fp8Linear.quantize(weight, ops), Fp8Linear.quantize(weight, REFERENCE)
        assert layer.use_scaled_mm
        assert torch.equal(layer(x, bias), reference_layer(x, bias))
        exact = x.float() @ weight.float().t()
        assert (layer(x).float() - exact).norm() / exact.norm() < 0.1  # within FP8's rounding of weights and inputs

    def test_rejects_what_it_cannot_quantize(self, ops: KernelOps) -> None:
        x = torch.ones(3, 64, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ValueError, match="unit column stride"):
            ops.quantize_fp8_per_row(x.t())
        with pytest.raises(ValueError, match="unsupported dtype"):
            ops.quantize_fp8_per_row(x.to(torch.int32))
        with pytest.raises(ValueError, match="at least one column"):
            ops.quantize_fp8_per_row(x[:, :0])
        quantized, scale = ops.quantize_fp8_per_row(x[:0])
        assert quantized.shape == (0, 64) and scale.shape == (0, 1)
