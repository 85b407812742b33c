"""An FP8 linear layer's product taken with unit scales, then scaled by its rows' and columns' scales: the torch
reference against the scaled product computed directly (CPU), the kernel against the reference bit for bit (GPU),
and Fp8Linear's two row-count regimes against each other and against the exact product, and the error of their
accumulation (GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pagedserve.gpu_worker.models import fp8_linear
from pagedserve.gpu_worker.models.fp8_linear import UNIT_SCALE_MAX_ROWS, Fp8Linear, QuantizedRows
from pagedserve.kernels.fp8 import FP8_DTYPE, FP8_MAX
from pagedserve.kernels.ops import KernelOps
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_marks import NEEDS_FP8_GPU, NEEDS_GPU

REFERENCE = TorchReferenceOps()


def _product_inputs(num_rows: int, num_cols: int, dtype: torch.dtype, seed: int,
                    device: str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An unscaled bfloat16 product of e4m3 values (sums of 64 products: magnitudes up to about 1e6), positive row
    and column scales spanning four decades, and a bias in dtype. The operands are clamped to e4m3's range, whose
    conversion would make NaN of anything beyond."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(num_rows, 64, generator=gen, device=device) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w = (torch.randn(num_cols, 64, generator=gen, device=device) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    raw = (x.float() @ w.float().t()).to(torch.bfloat16)
    assert raw.isfinite().all()
    row_scales = torch.logspace(-4, 0, num_rows, device=device)[:, None]
    col_scales = torch.rand(num_cols, generator=gen, device=device) * 1e-3 + 1e-5
    bias = torch.randn(num_cols, generator=gen, device=device).to(dtype)
    return raw, row_scales, col_scales, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_scales_rows_then_columns_then_adds_the_bias(dtype: torch.dtype) -> None:
    raw, row_scales, col_scales, bias = _product_inputs(5, 24, dtype, seed=1)
    got = REFERENCE.scale_fp8_product(raw, row_scales, col_scales, bias, dtype)
    assert got.dtype == dtype and got.shape == raw.shape
    expected = raw.double() * row_scales.double() * col_scales.double() + bias.double()
    assert torch.allclose(got.double(), expected, rtol=2 ** -7, atol=0)  # one rounding to 16 bits at most
    without_bias = REFERENCE.scale_fp8_product(raw, row_scales, col_scales, None, dtype)
    assert torch.equal(without_bias, (raw.float() * row_scales * col_scales).to(dtype))


@pytest.mark.usefixtures("poisoned_outputs")
class TestKernelMatchesReference:
    pytestmark = NEEDS_GPU

    @pytest.mark.parametrize(("num_rows", "num_cols"), [(1, 8), (3, 24), (64, 3072), (37, 1000), (9, 7)], ids=str)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    @pytest.mark.parametrize("has_bias", [False, True], ids=["no_bias", "bias"])
    def test_bit_for_bit(self, ops: KernelOps, num_rows: int, num_cols: int, dtype: torch.dtype,
                         has_bias: bool) -> None:
        raw, row_scales, col_scales, bias = _product_inputs(num_rows, num_cols, dtype, seed=num_cols, device="cuda")
        expected = REFERENCE.scale_fp8_product(raw, row_scales, col_scales, bias if has_bias else None, dtype)
        got = ops.scale_fp8_product(raw.clone(), row_scales, col_scales, bias if has_bias else None, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, expected)

    def test_a_bfloat16_result_is_written_over_the_product(self, ops: KernelOps) -> None:
        raw, row_scales, col_scales, bias = _product_inputs(4, 64, torch.bfloat16, seed=2, device="cuda")
        got = ops.scale_fp8_product(raw, row_scales, col_scales, bias, torch.bfloat16)
        assert got.data_ptr() == raw.data_ptr()

    def test_rejects_scales_of_the_wrong_shape_naming_them(self, ops: KernelOps) -> None:
        raw, row_scales, col_scales, _ = _product_inputs(4, 64, torch.bfloat16, seed=3, device="cuda")
        with pytest.raises(ValueError, match=r"row_scales \[rows, 1\]"):
            ops.scale_fp8_product(raw, row_scales[:, 0], col_scales, None, torch.bfloat16)
        with pytest.raises(ValueError, match="contiguous float32 row_scales"):  # a column of a wider tensor
            ops.scale_fp8_product(raw, torch.ones(4, 2, device="cuda")[:, :1], col_scales, None, torch.bfloat16)
        with pytest.raises(ValueError, match=r"bias must be a contiguous \[64\]"):
            ops.scale_fp8_product(raw, row_scales, col_scales, col_scales, torch.bfloat16)


@pytest.mark.usefixtures("poisoned_outputs")
class TestFp8LinearRowRegimes:
    pytestmark = NEEDS_FP8_GPU

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
    def test_unit_scales_up_to_the_limit_then_scales_in_the_product(
        self, ops: KernelOps, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
    ) -> None:
        """Both regimes give the same product up to bfloat16 rounding, and each is the exact product within FP8's
        rounding; which one ran is seen from the scales _scaled_mm was given."""
        gen = torch.Generator(device="cuda").manual_seed(4)
        weight = torch.randn(512, 1024, generator=gen, device="cuda").to(dtype)
        bias = torch.randn(512, generator=gen, device="cuda").to(dtype)
        x = torch.randn(UNIT_SCALE_MAX_ROWS + 1, 1024, generator=gen, device="cuda").to(dtype)
        layer = Fp8Linear.quantize(weight, ops)
        scales_seen: list[tuple[int, ...]] = []
        scaled_mm = torch._scaled_mm

        def spy(*args: object, **kwargs: Tensor) -> Tensor:
            scales_seen.append(tuple(kwargs["scale_a"].shape))
            return scaled_mm(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(torch, "_scaled_mm", spy)
        at_limit = layer(x[:UNIT_SCALE_MAX_ROWS], bias)
        beyond = layer(x, bias)
        monkeypatch.setattr(fp8_linear, "UNIT_SCALE_MAX_ROWS", 0)
        scaled_in_product = layer(x[:UNIT_SCALE_MAX_ROWS], bias)
        rows = (UNIT_SCALE_MAX_ROWS, 1)
        assert scales_seen == [(), (UNIT_SCALE_MAX_ROWS + 1, 1), rows]
        # The same e4m3 operands and accumulation: only where the scales are applied, and so the roundings, differ.
        torch.testing.assert_close(at_limit, scaled_in_product, rtol=2 ** -7, atol=2e-2)
        exact = x.float() @ weight.float().t() + bias.float()
        for out in (at_limit, beyond, scaled_in_product):
            assert out.dtype == dtype
            assert (out.float() - exact[: len(out)]).norm() / exact[: len(out)].norm() < 0.1

    @pytest.mark.parametrize("num_rows", [64, UNIT_SCALE_MAX_ROWS + 256], ids=["unit_scales", "row_wise"])
    def test_fast_accumulation_adds_a_small_part_of_the_rows_rounding_error(
        self, ops: KernelOps, monkeypatch: pytest.MonkeyPatch, num_rows: int
    ) -> None:
        """Layers sum on the tensor cores' own accumulator unless set otherwise, and over 8B's longest reduction
        (down_proj, 14,336) that errs by well under what rounding the rows to e4m3 costs the product anyway
        (measured: an eighth to a seventh; bound: a quarter)."""
        gen = torch.Generator(device="cuda").manual_seed(5)
        layer = Fp8Linear.quantize(torch.randn(512, 14336, generator=gen, device="cuda").to(torch.bfloat16), ops)
        x = torch.randn(num_rows, 14336, generator=gen, device="cuda").to(torch.bfloat16)
        rows = QuantizedRows(*ops.quantize_fp8_per_row(x))
        accumulations_seen: list[object] = []
        scaled_mm = torch._scaled_mm

        def spy(*args: object, **kwargs: Tensor) -> Tensor:
            accumulations_seen.append(kwargs["use_fast_accum"])
            return scaled_mm(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(torch, "_scaled_mm", spy)
        fast = layer(rows).double()
        layer.fast_accumulation = False
        layer(rows)
        assert accumulations_seen == [True, False]
        weight = layer.weight.double() * layer.weight_scale.double()[:, None]
        exact_operands = (rows.values.double() * rows.scales.double()) @ weight.T
        exact_rows = x.double() @ weight.T
        accumulation_error = (fast - exact_operands).norm() / exact_operands.norm()
        rows_rounding_error = (exact_operands - exact_rows).norm() / exact_rows.norm()
        assert accumulation_error < 0.25 * rows_rounding_error
