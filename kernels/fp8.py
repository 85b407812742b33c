"""FP8 e4m3 as the KV cache stores it: the dtype, its range, and scaled quantize / dequantize in torch."""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value; quantizing saturates to it, as the kernels' satfinite does


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def quantize(x: Tensor, scale: float | Tensor) -> Tensor:
    """x / scale in float32 (a true division, as the kernels' __fdiv_rn), saturated to +-FP8_MAX, rounded to
    nearest e4m3 (ties to even). The divisor is made a tensor on x's device: torch's CUDA division by a Python
    number multiplies by its rounded reciprocal, which rounds some quotients differently."""
    divisor = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / divisor).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: Tensor, scale: float | Tensor) -> Tensor:
    """e4m3 x times scale, in float32 (exact up to the product's rounding)."""
    return x.float() * scale


def as_bytes(x: Tensor) -> Tensor:
    """An FP8 tensor viewed as uint8 (torch indexes and copies those everywhere); others unchanged."""
    return x.view(torch.uint8) if is_fp8(x.dtype) else x
