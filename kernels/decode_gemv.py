"""Launcher of decode_gemv.cu: a linear layer's product for the few rows of a decode step, streaming the weight at
close to the memory bandwidth: an FP8 weight dequantized in registers (W8A16), or a 16-bit weight of the
activations' dtype. One row runs on the CUDA cores; two to GEMV_MAX_ROWS on the tensor cores, whose cost barely
grows with the rows."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.launch_args import address, int32, int64, pointer, scalar_type_name

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "decode_gemv.cu"
GEMV_MAX_ROWS = 16  # more rows of an FP8 weight go through per-token quantization and torch._scaled_mm
GEMV_DTYPES = (torch.float16, torch.bfloat16)
WARPS = 4  # kGemvWarps in decode_gemv.cu: the one-row kernel's
MMA_WARPS = 8  # kGemvMmaWarps: the tensor-core kernel's (2..GEMV_MAX_ROWS rows)
MMA_CHANNELS = 16  # kGemvMmaChannels: output channels a CTA of the tensor-core kernel, an mma's rows
VECTOR_BYTES = 16  # one lane's load of W (16 e4m3 or 8 16-bit weights) and of x (8 elements)
# A 16-bit weight takes the GEMV (instead of cuBLAS) at up to this many rows and elements: at one row it was faster
# on every linear layer of the 1B and 8B shapes, by 3 to 25 %; at two to eight rows (the tensor-core kernel) a layer's
# four products took 2-5 % less than cuBLAS's, though one of them (1B down, 8B gate_up) 0-2 % more. The LM heads (262M
# and 525M elements) keep cuBLAS (benchmarks/results/2026-12-05-decode-products-nvidia-h100-80gb-hbm3-aa9bbf7.md,
# 2026-12-06-decode-gemv-rows-on-tensor-cores-nvidia-h100-eddaf87.md).
MAX_16_BIT_ROWS = 8
MAX_16_BIT_ELEMENTS = 128 * 2**20
WIDE_IN_FEATURES = 4096  # at one row, a weight this wide ...
PAIRED_OUT_FEATURES = 4096  # ... with this many channels takes two channels a warp (channels_per_warp)


def channels_per_warp(out_features: int, in_features: int) -> int:
    """Output channels a warp of the one-row kernel owns: two for a wide weight (in >= 4096) with 4096 channels, one
    for the rest (measured on the H200 at one row, 8B shape: o 6.3 us with two against 8.3 with one, down 17.1
    against 22.7, qkv 10.3 against 9.2; 1B shape: down 8.7 against 7.1)."""
    return 2 if in_features >= WIDE_IN_FEATURES and out_features == PAIRED_OUT_FEATURES else 1


def kernel_name(dtype: torch.dtype, weight_dtype: torch.dtype, num_rows: int, channels: int = 0) -> str:
    """The kernel for num_rows rows: the one-row kernel with `channels` channels a warp, or the tensor-core one."""
    weight = scalar_type_name(weight_dtype) if weight_dtype != FP8_DTYPE else "fp8_e4m3_t"
    if num_rows == 1:
        return f"decode_gemv<{scalar_type_name(dtype)}, {weight}, {channels}>"
    return f"decode_gemv_mma<{scalar_type_name(dtype)}, {weight}, {num_rows}>"


def known_name_expressions() -> list[str]:
    """Every instantiation the launcher can ask for: each 16-bit dtype with e4m3 weights and weights of its own dtype,
    at one row with one or two channels a warp, and at each row count from 2 to GEMV_MAX_ROWS on the tensor cores."""
    return [kernel_name(dtype, weight_dtype, rows, channels) for dtype in GEMV_DTYPES
            for weight_dtype in (FP8_DTYPE, dtype)
            for rows, channels in [(1, 1), (1, 2)] + [(rows, 0) for rows in range(2, GEMV_MAX_ROWS + 1)]]


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether the GEMV takes x [num_rows, in] times the weight [out, in] (e4m3, or x's dtype): 1..GEMV_MAX_ROWS rows
    of float16 or bfloat16 with unit column stride, every row and the weight 16-byte aligned, in a whole number of
    16-byte vectors of the weight."""
    num_rows, in_features = x.shape
    itemsize = x.itemsize
    return (x.dtype in GEMV_DTYPES and in_features == weight.shape[1] and takes_rows(num_rows, weight)
            and x.stride(1) == 1 and x.data_ptr() % VECTOR_BYTES == 0
            and (num_rows == 1 or x.stride(0) * itemsize % VECTOR_BYTES == 0))


def takes_rows(num_rows: int, weight: Tensor) -> bool:
    """Whether the GEMV takes num_rows rows laid out as supports requires them (a new contiguous tensor's rows of
    float16 or bfloat16 are) times the weight [out, in]."""
    return (0 < num_rows <= GEMV_MAX_ROWS and weight.shape[1] * weight.itemsize % VECTOR_BYTES == 0
            and weight.is_contiguous() and weight.data_ptr() % VECTOR_BYTES == 0)


def takes_16_bit(x: Tensor, weight: Tensor) -> bool:
    """Whether x [num_rows, in] times the weight [out, in] of x's dtype goes through the GEMV rather than cuBLAS:
    where it measured faster (MAX_16_BIT_ROWS, MAX_16_BIT_ELEMENTS) and supports(x, weight) holds."""
    return (x.dim() == 2 and x.shape[0] <= MAX_16_BIT_ROWS and weight.dtype == x.dtype
            and weight.numel() <= MAX_16_BIT_ELEMENTS and x.is_cuda and supports(x, weight))


class DecodeGemv:
    """The GEMV on torch's current stream: no host sync, and no allocation but the returned output, so it is
    capturable in a CUDA graph once an eager call has compiled it."""

    def __init__(self, modules: ModuleCache) -> None:
        self._modules = modules

    def fp8_gemv(self, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [num_rows, in] float16 / bfloat16 (rows may be strided) times e4m3 weight [out, in] row-major with
        float32 weight_scale [out] (+ bias [out] in x's dtype) -> new contiguous [num_rows, out] in x's dtype:
        weight_scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in float32. Needs compute capability 8.9
        or later (the e4m3 conversion) and what supports(x, weight) checks."""
        _check(x, weight, FP8_DTYPE, bias)
        _check_scale(weight, weight_scale)
        return self._launch(x, weight, pointer(weight_scale), bias)

    def gemv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [num_rows, in] float16 / bfloat16 (rows may be strided) times weight [out, in] row-major of x's dtype
        (+ bias [out]) -> new contiguous [num_rows, out]: F.linear, accumulated in float32. Needs what
        supports(x, weight) checks; takes_16_bit says where it is the faster product."""
        _check(x, weight, x.dtype, bias)
        return self._launch(x, weight, address(0), bias)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """KernelOps.linear: this GEMV where takes_16_bit says it is the faster product, else cuBLAS (F.linear)."""
        if takes_16_bit(x, weight):
            return self.gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def _launch(self, x: Tensor, weight: Tensor, scales: ctypes.c_uint64, bias: Tensor | None) -> Tensor:
        num_rows = x.shape[0]
        out_features, in_features = weight.shape
        out = x.new_empty((num_rows, out_features))
        if num_rows == 1:
            channels = channels_per_warp(out_features, in_features)
            warps, channels_per_cta = WARPS, WARPS * channels
        else:
            channels, warps, channels_per_cta = 0, MMA_WARPS, MMA_CHANNELS
        kernel = self._modules.kernel(SOURCE, kernel_name(x.dtype, weight.dtype, num_rows, channels))
        self._modules.launch(kernel, (-(-out_features // channels_per_cta), 1, 1), (warps * 32, 1, 1), (
            pointer(x), int64(x.stride(0)), pointer(weight), scales, address(0) if bias is None else pointer(bias),
            pointer(out), int32(out_features), int32(in_features),
        ))
        return out


def _check(x: Tensor, weight: Tensor, weight_dtype: torch.dtype, bias: Tensor | None) -> None:
    if weight.dim() != 2 or weight.dtype != weight_dtype or weight.shape[0] == 0:
        raise ValueError(f"weight must be a {weight_dtype} [out, in] tensor with out > 0, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if x.dim() != 2 or not x.is_cuda or not supports(x, weight):
        raise ValueError(f"x must be a CUDA [1..{GEMV_MAX_ROWS}, {weight.shape[1]}] float16 / bfloat16 tensor with "
                         f"unit column stride, 16-byte aligned rows and in a whole number of 16-byte weight vectors "
                         f"(weight contiguous and aligned), got {tuple(x.shape)} {x.dtype} strides {x.stride()} on "
                         f"{x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] {x.dtype} tensor, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, weight) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"decode_gemv tensors are spread over devices {sorted(map(str, devices))}")


def _check_scale(weight: Tensor, weight_scale: Tensor) -> None:
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32 or (
        not weight_scale.is_contiguous()
    ):
        raise ValueError(f"weight_scale must be a contiguous [{weight.shape[0]}] float32 tensor, got "
                         f"{tuple(weight_scale.shape)} {weight_scale.dtype}")
    if weight_scale.device != weight.device:
        raise ValueError(f"weight_scale must be on the weight's device {weight.device}, got {weight_scale.device}")
