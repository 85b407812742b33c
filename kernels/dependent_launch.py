"""Programmatic dependent launch (compute capability 9.0+): a kernel is queued with cuLaunchKernelEx and the
attribute that lets it start before the kernel ahead of it in the stream has finished. A CUDA graph captured from
such launches keeps the overlap as programmatic edges.

What it buys: a decode step is a chain of a few hundred small kernels, each of which used to start only after the
one before had drained, and a GEMV of a weight that no kernel writes can stream it while the kernel before finishes.
What it asks: every kernel launched this way waits for the grid before it (kernel_common.cuh's
wait_for_prior_grid) before it reads what that grid wrote or writes anything. Every kernel of this package does.
"""

from __future__ import annotations

import ctypes
import threading

from pagedserve.kernels.driver import driver_call, driver_function

LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID, cuda.h
MIN_COMPUTE_CAPABILITY = (9, 0)  # griddepcontrol
# Defined for the kernels' compilation when they are launched this way: kernel_common.cuh refuses to build them for
# an architecture without the wait.
COMPILE_DEFINE = "-DPAGEDSERVE_DEPENDENT_LAUNCH"


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padded to 8 bytes, then a 64-byte union whose first int is this attribute's value."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class DependentLauncher:
    """cuLaunchKernelEx with programmatic stream serialization allowed, one launch configuration per thread,
    rewritten for each launch. The driver call keeps the interpreter lock (ctypes.PyDLL), where CuPy's launchKernel
    released it. This launcher was measured as a whole; a plain launch that kept the lock was measured alone in
    benchmarks/results/2026-12-04-mixed-step-host-nvidia-h200-37fbf6c.md, where it cost one request at a time
    0.05-0.12 ms of TPOT."""

    def __init__(self) -> None:
        self._launch = driver_function("cuLaunchKernelEx", ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p)
        self._per_thread = threading.local()

    def _config(self) -> LaunchConfig:
        config: LaunchConfig | None = getattr(self._per_thread, "config", None)
        if config is None:
            attribute = LaunchAttribute(id=LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            config = LaunchConfig(attrs=ctypes.pointer(attribute), num_attrs=1)
            self._per_thread.attribute = attribute  # the config points into it
            self._per_thread.config = config
        return config

    def launch(self, function_ptr: int, grid: tuple[int, int, int], block: tuple[int, int, int],
               shared_bytes: int, stream_ptr: int, params_address: int) -> None:
        """Queue function_ptr on stream_ptr (the current context's) with the kernel parameters at params_address."""
        config = self._config()
        config.grid_x, config.grid_y, config.grid_z = grid
        config.block_x, config.block_y, config.block_z = block
        config.shared_bytes = shared_bytes
        config.stream = stream_ptr
        driver_call(self._launch(ctypes.byref(config), function_ptr, params_address, None), "cuLaunchKernelEx",
                    f"grid {grid}, block {block}, {shared_bytes} bytes of dynamic shared memory")
