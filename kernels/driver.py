"""The CUDA driver's functions that the worker calls through ctypes, and their status codes: a failure raises,
named."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _driver() -> ctypes.PyDLL:
    return ctypes.PyDLL("libcuda.so.1")  # the driver, as the CUDA runtime loads it


def driver_function(name: str, *argtypes: Any) -> ctypes._NamedFuncPointer:
    """The driver's function `name` taking argtypes and returning its status code (driver_call reads it). Called
    through ctypes.PyDLL, it keeps the interpreter lock: each call takes microseconds, while a thread that lets the
    lock go can wait far longer to take it back."""
    function = _driver()[name]  # a new function object: its argtypes are this caller's
    function.restype = ctypes.c_int
    function.argtypes = argtypes
    return function


@functools.cache
def _error_name() -> ctypes._NamedFuncPointer:
    return driver_function("cuGetErrorName", ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))


def driver_call(result: int, call: str, context: str = "") -> None:
    """Raises RuntimeError naming call, the driver's error and context unless result is CUDA_SUCCESS (0)."""
    if result == 0:
        return
    name = ctypes.c_char_p()
    _error_name()(result, ctypes.byref(name))
    detail = f", {context}" if context else ""
    raise RuntimeError(f"{call} failed: {(name.value or b'unknown error').decode()} ({result}){detail}")
