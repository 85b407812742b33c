"""The CUDA driver's status codes, for the calls this package makes through ctypes: a failure raises, named."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _error_name() -> ctypes._NamedFuncPointer:
    function = ctypes.PyDLL("libcuda.so.1").cuGetErrorName
    function.restype = ctypes.c_int
    function.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))
    return function


def driver_call(result: int, call: str, context: str = "") -> None:
    """Raises RuntimeError naming call, the driver's error and context unless result is CUDA_SUCCESS (0)."""
    if result == 0:
        return
    name = ctypes.c_char_p()
    _error_name()(result, ctypes.byref(name))
    detail = f", {context}" if context else ""
    raise RuntimeError(f"{call} failed: {(name.value or b'unknown error').decode()} ({result}){detail}")
