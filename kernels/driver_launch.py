"""cuLaunchKernel called with the interpreter lock held.

A launch costs the driver a few microseconds. CuPy's launchKernel releases the interpreter lock around it, so the
worker's other threads (its event loop, the thread that waits for the device) take the lock at every launch and the
launching thread then waits to get it back, up to the switch interval. A mixed step launches its attention kernels
between graph pieces, two or three a layer, so those waits landed on the step thread dozens of times a step.
ctypes.PyDLL keeps the lock for the call.
"""

from __future__ import annotations

import ctypes

import torch

_driver: ctypes.PyDLL | None = None


class KernelLaunchError(RuntimeError):
    """cuLaunchKernel refused a launch (its CUresult and name in the message)."""


def _load_driver() -> ctypes.PyDLL:
    driver = ctypes.PyDLL("libcuda.so.1")
    driver.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p]
    driver.cuLaunchKernel.restype = ctypes.c_int
    driver.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    driver.cuGetErrorName.restype = ctypes.c_int
    return driver


def current_stream(device_index: int) -> int:
    """The CUstream of torch's current stream on the device, without building a torch.cuda.Stream object."""
    return int(torch._C._cuda_getCurrentRawStream(device_index))


def launch_kernel(function: int, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
                  stream: int, params_address: int) -> None:
    """Queues the CUfunction on the stream with the kernel-parameter array at params_address; KernelLaunchError if
    the driver refuses it (a grid or block beyond the device's limits, too much shared memory, a sticky error)."""
    global _driver
    if _driver is None:
        _driver = _load_driver()
    result = _driver.cuLaunchKernel(function, *grid, *block, shared_bytes, stream, params_address, None)
    if result != 0:
        name = ctypes.c_char_p()
        _driver.cuGetErrorName(result, ctypes.byref(name))
        error = name.value.decode() if name.value else "unknown"
        raise KernelLaunchError(f"cuLaunchKernel failed: {error} ({result}), grid {grid}, block {block}, "
                                f"{shared_bytes} bytes of dynamic shared memory")
