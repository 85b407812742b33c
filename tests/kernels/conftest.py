"""Fixtures of the kernel tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from pagedserve.kernels.fp8 import is_fp8
from pagedserve.kernels.ops import KernelOps, get_kernel_ops

FP8_NAN_BYTE = 0x7F  # e4m3fn's NaN


@pytest.fixture(scope="module")
def ops() -> KernelOps:
    """The current CUDA device's kernel ops (a test module may define its own)."""
    return get_kernel_ops(torch.device("cuda", torch.cuda.current_device()))


@pytest.fixture
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor.new_empty (how the launchers allocate outputs) returns NaN-filled floats (NaN bytes for FP8) and -1
    integers, so an output element a kernel leaves unwritten fails the comparison."""
    new_empty = Tensor.new_empty

    def nan_new_empty(self: Tensor, size: tuple[int, ...], **kwargs: Any) -> Tensor:
        tensor = new_empty(self, size, **kwargs)
        if is_fp8(tensor.dtype):
            tensor.view(torch.uint8).fill_(FP8_NAN_BYTE)
        elif tensor.is_floating_point():
            tensor.fill_(float("nan"))
        else:
            tensor.fill_(-1)
        return tensor

    monkeypatch.setattr(Tensor, "new_empty", nan_new_empty)
