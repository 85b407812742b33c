"""FP8 (e4m3) linear layers: per-output-channel weight scales, dynamic per-token activation scales (W8A8)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from pagedserve.kernels import decode_gemv
from pagedserve.kernels.fp8 import FP8_DTYPE, quantize_per_row

if TYPE_CHECKING:
    from pagedserve.kernels.ops import KernelOps

# torch._scaled_mm runs e4m3 x e4m3 on tensor cores from Ada (sm_89) on; row-wise scales need both matrix sizes
# to be multiples of 16.
SCALED_MM_MIN_CAPABILITY = (8, 9)
SCALED_MM_ALIGNMENT = 16
# Up to this many rows the product is taken with unit scales and scaled after (ops.scale_fp8_product): on Hopper
# cuBLAS's tensor-wise FP8 kernels beat its row-wise ones by 1.3-2x at 16-64 rows, more than the extra pass costs;
# at 256 rows the two ways are even, beyond it the pass costs more (docs/fp8.md).
UNIT_SCALE_MAX_ROWS = 256
# The tensor cores' FP8 products are summed in their own accumulator over the whole reduction ("fast accumulation",
# as vLLM's Hopper FP8 kernels sum them) rather than moved into float32 registers every few steps. On an H100 a 1B or
# 8B layer's four products took 8-19 % less time at 1,024-2,048 rows (at 64-256, from 1 % more to 7 % less); their
# error (relative norm 1.9e-3 to 3.7e-3, against 1.7e-3 to 2.4e-3 with float32 sums) stays under a seventh of what
# rounding the rows to e4m3 costs anyway (2.65e-2), and the layer's total error moves by at most 2e-4
# (benchmarks/results/2026-12-07-fp8-accumulation-nvidia-h100.md).
FAST_ACCUMULATION = True
# Rows quantized at once at load: a 4096-wide chunk's float32 temporaries are 128 MiB each, where a whole 8B LM head's
# would be 2 GiB each.
QUANTIZE_CHUNK_ROWS = 8192


class QuantizedRows(NamedTuple):
    """An FP8 layer's input rows quantized per token by the op that produced them (ops.rms_norm_fp8,
    add_rms_norm_fp8, silu_and_mul_fp8), as the layer would quantize them itself (ops.quantize_fp8_per_row)."""

    values: torch.Tensor  # e4m3 [rows, in]
    scales: torch.Tensor  # float32 [rows, 1]


class Fp8Linear(nn.Module):
    """y = x W^T (+ bias) with W held as e4m3 weight [out, in] times weight_scale [out] (float32).

    On CUDA devices of compute capability 8.9 or later, up to GEMV_MAX_ROWS rows (decode steps) go through
    ops.fp8_gemv: the weight widened in registers and multiplied by x as it is (W8A16, float32 accumulation), bound
    by reading the weight once. More rows (use_scaled_mm) are quantized per token to e4m3
    (ops.quantize_fp8_per_row: one kernel on CUDA) and multiplied on FP8 tensor cores (torch._scaled_mm, with
    FAST_ACCUMULATION): up to UNIT_SCALE_MAX_ROWS rows with unit scales, the row and column scales applied after in one
    pass (ops.scale_fp8_product); beyond, scaling rows and columns in its epilogue. Where the layer would quantize
    (quantizes), the op producing its input may quantize instead and hand over QuantizedRows. Elsewhere (the CPU
    worker, and shapes _scaled_mm cannot take) it is the reference: the weight dequantized to the model dtype, then an
    ordinary matmul. Weight and scales are buffers, not parameters: the decoder's own loader, which requires every
    parameter, never sees them (pagedserve.gpu_worker.fp8_weights fills them).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    fast_accumulation = FAST_ACCUMULATION  # a layer may be set otherwise, to compare the two (benchmarks, tests)

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype, ops: KernelOps) -> None:
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2 or weight_scale.shape != (weight.shape[0],):
            raise ValueError(f"need an e4m3 [out, in] weight and [out] scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(weight_scale.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.unit_scale = torch.ones((), device=weight.device)  # _scaled_mm's tensor-wise scales; not a weight
        self.dtype = dtype
        self.ops = ops
        out_features, in_features = weight.shape
        has_fp8_kernels = (weight.is_cuda
                           and torch.cuda.get_device_capability(weight.device) >= SCALED_MM_MIN_CAPABILITY)
        self.use_gemv = has_fp8_kernels and dtype in decode_gemv.GEMV_DTYPES
        self.use_scaled_mm = (has_fp8_kernels and out_features % SCALED_MM_ALIGNMENT == 0
                              and in_features % SCALED_MM_ALIGNMENT == 0)

    @classmethod
    def quantize(cls, weight: torch.Tensor, ops: KernelOps) -> Fp8Linear:
        """The layer of a model-dtype weight [out, in], quantized per output channel, QUANTIZE_CHUNK_ROWS channels at
        a time (each row's scale is its own, so the chunks change nothing but the peak memory); ops (the device's
        kernel ops) quantize its inputs."""
        rows, columns = weight.shape
        quantized = torch.empty(rows, columns, device=weight.device, dtype=FP8_DTYPE)
        scale = torch.empty(rows, device=weight.device)
        for start in range(0, rows, QUANTIZE_CHUNK_ROWS):
            chunk = slice(start, start + QUANTIZE_CHUNK_ROWS)
            chunk_values, chunk_scale = quantize_per_row(weight.detach()[chunk])
            quantized[chunk], scale[chunk] = chunk_values, chunk_scale.squeeze(1)
        return cls(quantized, scale, weight.dtype, ops)

    @classmethod
    def empty(cls, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype,
              ops: KernelOps) -> Fp8Linear:
        """An unfilled layer, for a checkpoint that is already FP8 to be copied into."""
        weight = torch.empty(out_features, in_features, device=device, dtype=FP8_DTYPE)
        return cls(weight, torch.ones(out_features, device=device), dtype, ops)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer stands for, [out, in] in the model dtype."""
        return (self.weight.float() * self.weight_scale[:, None]).to(self.dtype)

    def quantizes(self, num_rows: int) -> bool:
        """Whether forward quantizes num_rows new contiguous rows (and so takes QuantizedRows of them)."""
        return self.use_scaled_mm and not (self.use_gemv and decode_gemv.takes_rows(num_rows, self.weight))

    def forward(self, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in] model dtype, or QuantizedRows where quantizes(rows) -> [..., out] model dtype."""
        if isinstance(x, QuantizedRows):
            return self._scaled_product(x.values, x.scales, bias)
        rows = x.reshape(-1, x.shape[-1])
        if self.use_gemv and decode_gemv.supports(rows, self.weight):
            return self.ops.fp8_gemv(rows, self.weight, self.weight_scale, bias).view(*x.shape[:-1], -1)
        if not self.use_scaled_mm:
            return self.ops.linear(x, self.dequantized(), bias)
        out = self._scaled_product(*self.ops.quantize_fp8_per_row(rows), bias)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _scaled_product(self, quantized: torch.Tensor, x_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """e4m3 rows [rows, in] with their float32 scales [rows, 1], times the weight on FP8 tensor cores ->
        [rows, out] model dtype."""
        if quantized.shape[0] <= UNIT_SCALE_MAX_ROWS:
            raw = torch._scaled_mm(quantized, self.weight.t(), scale_a=self.unit_scale, scale_b=self.unit_scale,
                                   out_dtype=torch.bfloat16, use_fast_accum=self.fast_accumulation)
            return self.ops.scale_fp8_product(raw, x_scale, self.weight_scale, bias, self.dtype)
        # Row-wise scaling produces bfloat16; float16 models round once more.
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :],
                               bias=bias if self.dtype == torch.bfloat16 else None, out_dtype=torch.bfloat16,
                               use_fast_accum=self.fast_accumulation)
        out = out.to(self.dtype)
        if bias is not None and self.dtype != torch.bfloat16:
            out = out + bias
        return out

    if TYPE_CHECKING:  # nn.Module.__call__ runs forward (and any hooks) but is typed as returning Any
        __call__ = forward


def linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor | Fp8Linear, ops: KernelOps,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """ops.linear for a model-dtype weight [out, in], or the FP8 layer standing in for it (which also takes the
    QuantizedRows that quantized_for asked for)."""
    if isinstance(weight, Fp8Linear):
        return weight(x, bias)
    if isinstance(x, QuantizedRows):
        raise TypeError("quantized rows are an FP8 layer's input, not a model-dtype weight's")
    return ops.linear(x, weight, bias)


def quantized_for(weight: torch.Tensor | Fp8Linear, num_rows: int) -> bool:
    """Whether the op producing num_rows input rows of weight hands them over quantized (QuantizedRows): weight is
    an FP8 layer that would quantize them itself, so the producer's fused *_fp8 op saves a pass over the rows."""
    return isinstance(weight, Fp8Linear) and weight.quantizes(num_rows)
