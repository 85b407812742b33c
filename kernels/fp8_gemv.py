"""Launcher of fp8_gemv.cu: an FP8 linear layer's product for the few rows of a decode step, weight-only
dequantized (W8A16), streaming the e4m3 weight at close to the memory bandwidth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.launch_args import address, int32, int64, pointer, scalar_type_name

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "fp8_gemv.cu"
GEMV_MAX_ROWS = 8  # more rows go through per-token quantization and torch._scaled_mm (FP8 tensor cores)
GEMV_DTYPES = (torch.float16, torch.bfloat16)
WARPS = 4  # kGemvWarps in fp8_gemv.cu
VECTOR_BYTES = 16  # one lane's load of W: 16 e4m3; of x: 8 elements, twice
WIDE_IN_FEATURES = 4096  # at one row, a weight this wide ...
PAIRED_OUT_FEATURES = 4096  # ... with this many channels takes two channels a warp (channels_per_warp)


def channels_per_warp(num_rows: int, out_features: int, in_features: int) -> int:
    """Output channels a warp owns. Two from two rows on: that halves the reads of x per byte of W. At one row, two
    for a wide weight (in >= 4096) with 4096 channels, one for the rest (measured on the H200 at one row, 8B shape:
    o 6.3 us with two against 8.3 with one, down 17.1 against 22.7, qkv 10.3 against 9.2; 1B shape: down 8.7
    against 7.1)."""
    if num_rows > 1:
        return 2
    return 2 if in_features >= WIDE_IN_FEATURES and out_features == PAIRED_OUT_FEATURES else 1


def kernel_name(dtype: torch.dtype, num_rows: int, channels: int) -> str:
    return f"fp8_gemv<{scalar_type_name(dtype)}, {num_rows}, {channels}>"


def known_name_expressions() -> list[str]:
    """Every instantiation the launcher can ask for: each 16-bit dtype and row count up to GEMV_MAX_ROWS, with one or
    two channels a warp at one row."""
    counts = [(1, 1), (1, 2)] + [(rows, 2) for rows in range(2, GEMV_MAX_ROWS + 1)]
    return [kernel_name(dtype, rows, channels) for dtype in GEMV_DTYPES for rows, channels in counts]


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether fp8_gemv takes x [num_rows, in] times the e4m3 weight [out, in]: 1..GEMV_MAX_ROWS rows of float16 or
    bfloat16 with unit column stride, every row and the weight 16-byte aligned, in a multiple of 16."""
    num_rows, in_features = x.shape
    itemsize = x.itemsize
    return (x.dtype in GEMV_DTYPES and in_features == weight.shape[1] and takes_rows(num_rows, weight)
            and x.stride(1) == 1 and x.data_ptr() % VECTOR_BYTES == 0
            and (num_rows == 1 or x.stride(0) * itemsize % VECTOR_BYTES == 0))


def takes_rows(num_rows: int, weight: Tensor) -> bool:
    """Whether fp8_gemv takes num_rows rows laid out as supports requires them (a new contiguous tensor's rows of
    float16 or bfloat16 are) times the e4m3 weight [out, in]."""
    return (0 < num_rows <= GEMV_MAX_ROWS and weight.shape[1] % VECTOR_BYTES == 0 and weight.is_contiguous()
            and weight.data_ptr() % VECTOR_BYTES == 0)


class Fp8Gemv:
    """fp8_gemv on torch's current stream: no host sync, and no allocation but the returned output, so it is
    capturable in a CUDA graph once an eager call has compiled it."""

    def __init__(self, modules: ModuleCache) -> None:
        self._modules = modules

    def fp8_gemv(self, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [num_rows, in] float16 / bfloat16 (rows may be strided) times e4m3 weight [out, in] row-major with
        float32 weight_scale [out] (+ bias [out] in x's dtype) -> new contiguous [num_rows, out] in x's dtype:
        weight_scale[n] * sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in float32. Needs compute capability 8.9
        or later (the e4m3 conversion) and what supports(x, weight) checks."""
        _check(x, weight, weight_scale, bias)
        num_rows = x.shape[0]
        out_features, in_features = weight.shape
        out = x.new_empty((num_rows, out_features))
        channels = channels_per_warp(num_rows, out_features, in_features)
        channels_per_cta = WARPS * channels
        kernel = self._modules.kernel(SOURCE, kernel_name(x.dtype, num_rows, channels))
        self._modules.launch(kernel, (-(-out_features // channels_per_cta), 1, 1), (WARPS * 32, 1, 1), (
            pointer(x), int64(x.stride(0)), pointer(weight), pointer(weight_scale),
            address(0) if bias is None else pointer(bias), pointer(out), int32(out_features), int32(in_features),
        ))
        return out


def _check(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE or weight.shape[0] == 0:
        raise ValueError(f"weight must be an e4m3 [out, in] tensor with out > 0, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if x.dim() != 2 or not x.is_cuda or not supports(x, weight):
        raise ValueError(f"x must be a CUDA [1..{GEMV_MAX_ROWS}, {weight.shape[1]}] float16 / bfloat16 tensor with "
                         f"unit column stride, 16-byte aligned rows and in a multiple of 16 (weight contiguous and "
                         f"aligned), got {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}")
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32 or (
        not weight_scale.is_contiguous()
    ):
        raise ValueError(f"weight_scale must be a contiguous [{weight.shape[0]}] float32 tensor, got "
                         f"{tuple(weight_scale.shape)} {weight_scale.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] {x.dtype} tensor, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, weight, weight_scale) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"fp8_gemv tensors are spread over devices {sorted(map(str, devices))}")
