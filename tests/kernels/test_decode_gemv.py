"""The weight GEMV of decode steps: with FP8 weights (W8A16), the torch reference against the same math in NumPy
float64 (CPU), the kernel against the reference (GPU, compute capability 8.9 or later) and which path an FP8 linear
layer takes; with 16-bit weights, the kernel against float64 (GPU) and which products ops.linear gives it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear
from pagedserve.kernels.decode_gemv import (
    GEMV_MAX_ROWS,
    MAX_16_BIT_ELEMENTS,
    MAX_16_BIT_ROWS,
    DecodeGemv,
    supports,
)
from pagedserve.kernels.fp8 import quantize_per_row
from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU, NEEDS_GPU

REFERENCE = TorchReferenceOps()
SHAPES = ((3072, 2048), (6144, 4096), (28672, 4096), (4096, 14336), (1024, 2048))  # (out, in)
TOLERANCE = 2e-2  # relative, and absolute relative to the output's mean magnitude


def _inputs(num_rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int,
            device: str = "cpu", row_padding: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [num_rows, in] (rows in_features + row_padding apart when padded), an e4m3 weight [out, in] with its
    per-channel scales, and a bias [out]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    padded = torch.randn(num_rows, in_features + row_padding, generator=gen, device=device).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen, device=device) * torch.logspace(
        -2, 1, out_features, device=device)[:, None]
    quantized, scale = quantize_per_row(weight)
    bias = torch.randn(out_features, generator=gen, device=device).to(dtype)
    return padded[:, row_padding // 2 : row_padding // 2 + in_features], quantized, scale.squeeze(1), bias


def _assert_close(got: Tensor, expected: Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), rtol=TOLERANCE,
                               atol=TOLERANCE * expected.float().abs().mean().item())


# -- the torch reference (CPU) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_is_the_dequantized_product_of_numpy(dtype: torch.dtype, with_bias: bool) -> None:
    x, weight, scale, bias = _inputs(3, 96, 160, dtype, seed=1, row_padding=32)
    got = REFERENCE.fp8_gemv(x, weight, scale, bias if with_bias else None)
    exact = x.double().numpy() @ (weight.double().numpy() * scale.double().numpy()[:, None]).T
    if with_bias:
        exact += bias.double().numpy()
    # One rounding to the output dtype from float32 accumulation: within two units in the last place of dtype.
    eps = torch.finfo(dtype).eps
    assert got.dtype == dtype and got.shape == (3, 96)
    np.testing.assert_allclose(got.double().numpy(), exact, rtol=2 * eps, atol=1e-4 * np.abs(exact).mean())


# -- the kernel against the reference (GPU) ------------------------------------------------------------------------

@pytest.mark.usefixtures("poisoned_outputs")
class TestKernelMatchesReference:
    pytestmark = NEEDS_FP8_GPU

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
    @pytest.mark.parametrize("num_rows", [1, 2, 3, 8])
    def test_random_inputs(self, ops: KernelOps, dtype: torch.dtype, out_features: int, in_features: int,
                           num_rows: int) -> None:
        x, weight, scale, bias = _inputs(num_rows, out_features, in_features, dtype, seed=num_rows + in_features,
                                         device="cuda")
        _assert_close(ops.fp8_gemv(x, weight, scale), REFERENCE.fp8_gemv(x, weight, scale))
        _assert_close(ops.fp8_gemv(x, weight, scale, bias), REFERENCE.fp8_gemv(x, weight, scale, bias))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("num_rows", list(range(1, GEMV_MAX_ROWS + 1)))
    @pytest.mark.parametrize("out_features", [1, 13, 1030])  # channels that leave a warp or CTA part-filled
    def test_every_row_count_strided_rows_and_ragged_channels(self, ops: KernelOps, dtype: torch.dtype,
                                                               num_rows: int, out_features: int) -> None:
        x, weight, scale, bias = _inputs(num_rows, out_features, 2064, dtype, seed=num_rows, device="cuda",
                                         row_padding=16)
        assert x.stride(0) == x.shape[1] + 16  # rows strided (torch calls a single row contiguous anyway)
        _assert_close(ops.fp8_gemv(x, weight, scale, bias), REFERENCE.fp8_gemv(x, weight, scale, bias))

    def test_replayed_from_a_cuda_graph(self, ops: KernelOps) -> None:
        x, weight, scale, bias = _inputs(1, 4096, 4096, torch.bfloat16, seed=3, device="cuda")
        ops.fp8_gemv(x, weight, scale, bias)  # compiles before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = ops.fp8_gemv(x, weight, scale, bias)
        x.copy_(_inputs(1, 4096, 4096, torch.bfloat16, seed=4, device="cuda")[0])  # new inputs, written in place
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, REFERENCE.fp8_gemv(x, weight, scale, bias))

    def test_rejects_what_it_cannot_multiply(self, ops: KernelOps) -> None:
        x, weight, scale, bias = _inputs(2, 64, 256, torch.bfloat16, seed=5, device="cuda", row_padding=16)
        wide = torch.zeros(GEMV_MAX_ROWS + 1, 512, device="cuda", dtype=torch.bfloat16)
        misaligned, too_many_rows, transposed = wide[:2, 1:257], wide[:, :256], wide[:256, :2].t()
        assert supports(x, weight)
        for bad_x in (misaligned, too_many_rows, transposed, x[:, :240], x.float()):
            with pytest.raises(ValueError, match="x must be"):
                ops.fp8_gemv(bad_x, weight, scale)
        with pytest.raises(ValueError, match="weight_scale must be"):
            ops.fp8_gemv(x, weight, scale.half())
        with pytest.raises(ValueError, match="bias must be"):
            ops.fp8_gemv(x, weight, scale, bias.float())
        with pytest.raises(ValueError, match="weight must be"):
            ops.fp8_gemv(x, weight.float(), scale)


class _Calls:
    """Counts the calls of the function it wraps."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function, self.count = function, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.function(*args, **kwargs)


@pytest.mark.usefixtures("poisoned_outputs")
class TestFp8LinearRouting:
    pytestmark = NEEDS_FP8_GPU

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_one_row_runs_the_gemv(self, ops: KernelOps, monkeypatch: pytest.MonkeyPatch,
                                   dtype: torch.dtype) -> None:
        x, weight, scale, bias = _inputs(1, 512, 1024, dtype, seed=7, device="cuda")
        gemv, scaled_mm = self._spy(ops, monkeypatch)
        out = Fp8Linear(weight, scale, dtype, ops)(x[:, None, :], bias)  # [rows, 1, in]: leading dimensions kept
        assert (gemv.count, scaled_mm.count) == (1, 0)
        assert out.shape == (1, 1, 512)
        _assert_close(out[:, 0], REFERENCE.fp8_gemv(x, weight, scale, bias))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_sixty_four_rows_run_scaled_mm(self, ops: KernelOps, monkeypatch: pytest.MonkeyPatch,
                                           dtype: torch.dtype) -> None:
        x, weight, scale, bias = _inputs(64, 512, 1024, dtype, seed=8, device="cuda")
        gemv, scaled_mm = self._spy(ops, monkeypatch)
        out = Fp8Linear(weight, scale, dtype, ops)(x, bias)
        assert (gemv.count, scaled_mm.count) == (0, 1)
        expected = REFERENCE.fp8_gemv(x, weight, scale, bias).float()
        # The activations are quantized too on this path (W8A8): within e4m3's rounding of them.
        assert (out.float() - expected).norm() / expected.norm() < 0.05

    @staticmethod
    def _spy(ops: KernelOps, monkeypatch: pytest.MonkeyPatch) -> tuple[_Calls, _Calls]:
        gemv, scaled_mm = _Calls(ops.fp8_gemv), _Calls(torch._scaled_mm)
        monkeypatch.setattr(ops, "fp8_gemv", gemv)
        monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
        return gemv, scaled_mm


# -- 16-bit weights (GPU) ------------------------------------------------------------------------------------------

def _sixteen_bit_inputs(num_rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int,
                        row_padding: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """x [num_rows, in] (rows in_features + row_padding apart when padded), a weight [out, in] and a bias [out],
    all of dtype, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    padded = torch.randn(num_rows, in_features + row_padding, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(out_features, in_features, generator=gen, device="cuda") / in_features**0.5).to(dtype)
    bias = torch.randn(out_features, generator=gen, device="cuda").to(dtype)
    return padded[:, row_padding // 2 : row_padding // 2 + in_features], weight, bias


def _assert_is_the_product(got: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """got is x @ weight.T (+ bias) computed in float64 and rounded once to x's dtype, within two of its units in the
    last place (the kernel accumulates in float32)."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert got.shape == exact.shape and got.dtype == x.dtype and got.is_contiguous()
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(got.double(), exact, rtol=2 * eps, atol=1e-3 * exact.abs().mean().item())


@pytest.fixture(scope="module")
def gemv() -> DecodeGemv:
    from pagedserve.kernels.module_cache import ModuleCache

    return DecodeGemv(ModuleCache(torch.device("cuda", torch.cuda.current_device())))


@pytest.mark.usefixtures("poisoned_outputs")
class TestSixteenBitWeights:
    pytestmark = NEEDS_GPU

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
    @pytest.mark.parametrize("num_rows", [1, 2, 3, 8, 12, 16])
    def test_random_inputs(self, gemv: DecodeGemv, dtype: torch.dtype, out_features: int, in_features: int,
                           num_rows: int) -> None:
        x, weight, bias = _sixteen_bit_inputs(num_rows, out_features, in_features, dtype, seed=num_rows + in_features)
        _assert_is_the_product(gemv.gemv(x, weight), x, weight, None)
        _assert_is_the_product(gemv.gemv(x, weight, bias), x, weight, bias)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("num_rows", [1, 2, 5, 9, 16])
    @pytest.mark.parametrize("out_features", [1, 13, 1030])  # channels that leave a warp or CTA part-filled
    def test_strided_rows_and_ragged_channels(self, gemv: DecodeGemv, dtype: torch.dtype, num_rows: int,
                                              out_features: int) -> None:
        x, weight, bias = _sixteen_bit_inputs(num_rows, out_features, 2056, dtype, seed=num_rows, row_padding=16)
        assert x.stride(0) == x.shape[1] + 16
        _assert_is_the_product(gemv.gemv(x, weight, bias), x, weight, bias)

    def test_replayed_from_a_cuda_graph(self, gemv: DecodeGemv) -> None:
        x, weight, bias = _sixteen_bit_inputs(1, 3072, 2048, torch.bfloat16, seed=3)
        gemv.gemv(x, weight, bias)  # compiles before capture
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = gemv.gemv(x, weight, bias)
        x.copy_(_sixteen_bit_inputs(1, 3072, 2048, torch.bfloat16, seed=4)[0])  # new inputs, written in place
        graph.replay()
        torch.cuda.synchronize()
        _assert_is_the_product(out, x, weight, bias)

    def test_rejects_what_it_cannot_multiply(self, gemv: DecodeGemv) -> None:
        x, weight, bias = _sixteen_bit_inputs(2, 64, 256, torch.bfloat16, seed=5)
        ragged = torch.zeros(2, 252, device="cuda", dtype=torch.bfloat16)  # 504 bytes: not whole 16-byte vectors
        with pytest.raises(ValueError, match="x must be"):
            gemv.gemv(ragged, torch.zeros(64, 252, device="cuda", dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="weight must be a torch.bfloat16"):
            gemv.gemv(x, weight.half())
        with pytest.raises(ValueError, match="bias must be"):
            gemv.gemv(x, weight, bias.float())

    @pytest.mark.parametrize(("num_rows", "out_features", "in_features", "takes_gemv"), [
        (MAX_16_BIT_ROWS, 3072, 2048, True),  # the 1B shape's qkv
        (MAX_16_BIT_ROWS + 1, 3072, 2048, False),
        (MAX_16_BIT_ROWS, 28672, 4096, True),  # the 8B shape's gate_up
        (MAX_16_BIT_ROWS, MAX_16_BIT_ELEMENTS // 8192 + 8, 8192, False),
        (MAX_16_BIT_ROWS, 1000, 2052, False),  # in not a whole number of 16-byte vectors
    ])
    def test_ops_linear_takes_the_gemv_only_where_it_is_faster(
        self, ops: KernelOps, monkeypatch: pytest.MonkeyPatch, num_rows: int, out_features: int, in_features: int,
        takes_gemv: bool,
    ) -> None:
        x, weight, bias = _sixteen_bit_inputs(num_rows, out_features, in_features, torch.bfloat16, seed=6)
        owner = ops.linear.__self__  # type: ignore[attr-defined]  # the DecodeGemv whose linear ops.linear is
        calls = _Calls(owner.gemv)
        monkeypatch.setattr(owner, "gemv", calls)
        out = ops.linear(x, weight, bias)
        assert calls.count == int(takes_gemv)
        torch.testing.assert_close(out.float(), F.linear(x, weight, bias).float(), rtol=2e-2, atol=2e-2)
