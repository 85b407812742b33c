"""The contract's DType and DeviceKind resolved to torch: the one place where these modes meet torch."""

from __future__ import annotations

import torch

from pagedserve.contract.model_format import DeviceKind, DType

_TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


def torch_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype of a concrete DType; ValueError for AUTO (resolve it against a model config first)."""
    if dtype is DType.AUTO:
        raise ValueError("DType.AUTO has no torch dtype until resolved against a model config")
    return _TORCH_DTYPES[dtype]


def dtype_from_torch(dtype: torch.dtype) -> DType:
    """The DType naming a torch dtype; ValueError for a dtype the worker does not serve in."""
    for member, value in _TORCH_DTYPES.items():
        if value == dtype:
            return member
    raise ValueError(f"unsupported dtype {dtype}")


def resolve_device(kind: DeviceKind) -> torch.device:
    """The concrete torch device (CUDA device 0 for AUTO/CUDA on a GPU host)."""
    if kind is DeviceKind.CPU or (kind is DeviceKind.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is visible")
    return torch.device("cuda", torch.cuda.current_device())
