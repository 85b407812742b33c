"""cuLaunchKernelEx's arguments as ctypes lays them out: the offsets of cuda.h's CUlaunchConfig and CUlaunchAttribute
on a 64-bit host, so that the driver reads the grid, the stream and the programmatic-serialization attribute where
they are written."""

from __future__ import annotations

import ctypes

from pagedserve.kernels.dependent_launch import _LaunchAttribute, _LaunchConfig


def test_the_launch_config_has_cuda_hs_layout() -> None:
    assert ctypes.sizeof(ctypes.c_void_p) == 8
    offsets = {field[0]: getattr(_LaunchConfig, field[0]).offset for field in _LaunchConfig._fields_}
    assert offsets == {"grid_x": 0, "grid_y": 4, "grid_z": 8, "block_x": 12, "block_y": 16, "block_z": 20,
                       "shared_bytes": 24, "stream": 32, "attributes": 40, "num_attributes": 48}
    assert ctypes.sizeof(_LaunchConfig) == 56


def test_the_attribute_holds_its_id_then_a_64_byte_value_8_bytes_in() -> None:
    assert (_LaunchAttribute.id.offset, _LaunchAttribute.value.offset) == (0, 8)
    assert ctypes.sizeof(_LaunchAttribute) == 72
