"""Kernel arguments as exact C types (ctypes values), shared by the launchers."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

# C++ element type each torch dtype is instantiated with (kernel_common.cuh).
SCALAR_TYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float16: "half_t",
    torch.bfloat16: "bfloat16_t",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    """The kernel element type for dtype; ValueError for dtypes the kernels do not support."""
    name = SCALAR_TYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {sorted(map(str, SCALAR_TYPE_NAMES))}")
    return name


def pointer(tensor: Tensor) -> ctypes.c_uint64:
    """Device address of tensor's first element, passed as a C pointer."""
    return ctypes.c_uint64(tensor.data_ptr())


def address(value: int) -> ctypes.c_uint64:
    """A device address computed on the host (e.g. an offset into a scratch buffer), passed as a C pointer."""
    return ctypes.c_uint64(value)


def int32(value: int) -> ctypes.c_int32:
    return ctypes.c_int32(value)


def int64(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(value)


def float32(value: float) -> ctypes.c_float:
    return ctypes.c_float(value)


def element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def log2_exact(value: int, name: str) -> int:
    """log2 of a power of two; ValueError naming the argument otherwise."""
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value.bit_length() - 1
