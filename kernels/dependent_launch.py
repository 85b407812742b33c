"""Programmatic dependent launch (Hopper on): a kernel queued so that it may start while the kernel before it on the
stream still runs, once every CTA of that kernel has executed `griddepcontrol.launch_dependents` (or exited).

The dependent kernel must execute `griddepcontrol.wait` before it reads anything the kernel before it writes, or
writes anything that kernel reads: the wait returns once that kernel has completed and its writes are visible. What
it does before the wait (loading weights, which no kernel writes during a step) overlaps the end of the kernel before
it and its own launch. A CUDA graph captured from the stream keeps the dependency as a programmatic edge.

cuLaunchKernelEx is called through ctypes: CuPy's driver module has no binding of it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

# cuda.h: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, and the first compute capability with griddepcontrol.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6
MIN_CAPABILITY = (9, 0)


class _LaunchAttributeValue(ctypes.Union):
    _fields_ = [("programmatic_stream_serialization_allowed", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttributeValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
        ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attributes", ctypes.POINTER(_LaunchAttribute)), ("num_attributes", ctypes.c_uint),
    ]


def supports_dependent_launch(device: torch.device) -> bool:
    """Whether kernels on this CUDA device may be launched as dependents (compute capability 9.0 or later)."""
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


@functools.cache
def _launch_kernel_ex() -> Callable[..., int]:
    function = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    function.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def launch_dependent(function_ptr: int, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
                     stream_ptr: int, params: ctypes.Array[ctypes.c_void_p]) -> None:
    """cuLaunchKernelEx of the kernel as a programmatic dependent of the stream's previous kernel; the current
    context must be the kernel's device's. Raises RuntimeError with the driver's error code."""
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value.programmatic_stream_serialization_allowed = 1
    config = _LaunchConfig(*grid, *block, shared_bytes, stream_ptr, ctypes.pointer(attribute), 1)
    result = _launch_kernel_ex()(ctypes.byref(config), function_ptr, ctypes.addressof(params), None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {result}")
