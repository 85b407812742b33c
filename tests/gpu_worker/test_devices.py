"""The contract's DType and DeviceKind resolved to torch dtypes and devices."""

from __future__ import annotations

import pytest
import torch

from pagedserve.contract.model_format import DeviceKind, DType
from pagedserve.gpu_worker.devices import dtype_from_torch, resolve_device, torch_dtype


def test_cpu_device_resolves_to_cpu() -> None:
    assert resolve_device(DeviceKind.CPU) == torch.device("cpu")


def test_dtype_maps_to_and_from_torch() -> None:
    assert [dtype_from_torch(torch_dtype(d)) for d in (DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16)] == [
        DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16]


def test_auto_dtype_has_no_torch_dtype() -> None:
    with pytest.raises(ValueError, match="AUTO"):
        torch_dtype(DType.AUTO)
