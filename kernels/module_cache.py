"""Compiles this package's CUDA sources with NVRTC through CuPy, once per template instantiation, and launches them."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cupy
import torch

from pagedserve.kernels.dependent_launch import COMPILE_DEFINE, MIN_COMPUTE_CAPABILITY, DependentLauncher
from pagedserve.kernels.prepared_launch import argument_addresses

KERNEL_DIR = Path(__file__).resolve().parent
# The same flags serve NVRTC here and nvcc in the source-compilation test.
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17", f"-I{KERNEL_DIR}")
STATIC_SHARED_LIMIT_BYTES = 48 * 1024  # more shared memory (static + dynamic) needs an opt-in per kernel


def kernel_source(source: str) -> str:
    """kernels/<source>, ending in a digest of the package's headers: CuPy keys its on-disk cache of compiled
    modules by source text and options only, so without it an edited header would load a stale binary."""
    headers = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(KERNEL_DIR.glob("*.cuh"))))
    return f"{(KERNEL_DIR / source).read_text()}\n// headers sha256 {headers.hexdigest()}\n"


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    """A loaded kernel: its CUfunction handle, the CuPy object keeping its module alive, and the dynamic shared
    memory a launch of it may ask for now (beyond it, ModuleCache.kernel opts in first)."""

    function_ptr: int
    raw: cupy.RawKernel
    dynamic_shared_limit: int

    @classmethod
    def of(cls, raw: cupy.RawKernel) -> CompiledKernel:
        """A kernel just loaded, not yet opted in to more shared memory than every launch may have."""
        return cls(int(raw.kernel.ptr), raw, STATIC_SHARED_LIMIT_BYTES - raw.shared_size_bytes)


class ModuleCache:
    """Compiled kernels of one CUDA device, keyed by (source file, template instantiation name).

    Each instantiation is compiled once per process (CuPy also keeps the binaries on disk across processes).
    Launches go on PyTorch's current stream of the device, so they order with torch work and are captured by
    torch.cuda.CUDAGraph; the host cost is a few microseconds. From compute capability 9.0 each is a programmatic
    dependent launch (dependent_launch.py), unless dependent_launch is False: it may start while the kernel before it
    finishes, and waits for it inside.
    """

    def __init__(self, device: torch.device, dependent_launch: bool = True) -> None:
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        self._kernels: dict[tuple[str, str], CompiledKernel] = {}
        capability = torch.cuda.get_device_capability(self._device_index)
        dependent = dependent_launch and capability >= MIN_COMPUTE_CAPABILITY
        self._dependent = DependentLauncher() if dependent else None
        self._options = COMPILE_OPTIONS + ((COMPILE_DEFINE,) if self._dependent is not None else ())

    @property
    def dependent_launches(self) -> bool:
        """Whether launches are programmatic dependent launches (compute capability 9.0 or later)."""
        return self._dependent is not None

    def kernel(self, source: str, name_expression: str, dynamic_shared_bytes: int = 0) -> CompiledKernel:
        """The kernel `name_expression` (e.g. "copy_blocks<uint4>") from kernels/<source>, compiled on first use,
        opted in to launches with dynamic_shared_bytes of dynamic shared memory (a later call may raise it)."""
        key = (source, name_expression)
        kernel = self._kernels.get(key)
        if kernel is None:
            with cupy.cuda.Device(self._device_index):
                module = cupy.RawModule(code=kernel_source(source), options=self._options,
                                        name_expressions=(name_expression,))
                raw = module.get_function(name_expression)
            kernel = CompiledKernel.of(raw)
            self._kernels[key] = kernel
        if dynamic_shared_bytes > kernel.dynamic_shared_limit:
            with cupy.cuda.Device(self._device_index):
                kernel.raw.max_dynamic_shared_size_bytes = dynamic_shared_bytes
            kernel = replace(kernel, dynamic_shared_limit=dynamic_shared_bytes)
            self._kernels[key] = kernel
        return kernel

    def is_device_accessible(self, tensor: torch.Tensor) -> bool:
        """True for CUDA tensors and for pinned host memory mapped at the same address on the device (UVA)."""
        if tensor.is_cuda:
            return True
        if not tensor.is_pinned():
            return False
        attributes = cupy.cuda.runtime.pointerGetAttributes(tensor.data_ptr())
        return int(attributes.devicePointer) == tensor.data_ptr()

    def launch(
        self,
        kernel: CompiledKernel,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: Sequence[ctypes._SimpleCData[Any] | ctypes.Structure],
        shared_bytes: int = 0,
    ) -> None:
        """Launch on torch's current stream of this device; nothing is copied or synchronised."""
        self.launch_params(kernel, grid, block, argument_addresses(args), shared_bytes)

    def launch_params(self, kernel: CompiledKernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                      params: ctypes.Array[ctypes.c_void_p], shared_bytes: int = 0) -> None:
        """launch() with the arguments' addresses already gathered (argument_addresses)."""
        stream_ptr = torch.cuda.current_stream(self._device_index).cuda_stream
        if torch.cuda.current_device() == self._device_index:
            self._queue(kernel, grid, block, params, shared_bytes, stream_ptr)
            return
        with torch.cuda.device(self._device_index):  # the handle belongs to this device's context
            self._queue(kernel, grid, block, params, shared_bytes, stream_ptr)

    def _queue(self, kernel: CompiledKernel, grid: tuple[int, int, int], block: tuple[int, int, int],
               params: ctypes.Array[ctypes.c_void_p], shared_bytes: int, stream_ptr: int) -> None:
        if self._dependent is not None:
            self._dependent.launch(kernel.function_ptr, grid, block, shared_bytes, stream_ptr,
                                   ctypes.addressof(params))
        else:
            cupy.cuda.driver.launchKernel(
                kernel.function_ptr, *grid, *block, shared_bytes, stream_ptr, ctypes.addressof(params), 0
            )
