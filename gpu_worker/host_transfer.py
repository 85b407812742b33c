"""Copies between host and device that never stall the stream: the host goes on queuing work while they run."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from pagedserve.kernels.driver import driver_call, driver_function


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; on a GPU an asynchronous copy from pinned memory, so it does not wait for the stream."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class DeviceToHost:
    """A device tensor on its way to the host: `start` queues the copy, `tensor()` waits for it alone.

    On a GPU the copy lands in pinned memory and an event marks its end, so waiting for it does not wait for
    work queued on the stream after it (the next step's forward pass).
    """

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        """A copy already queued into pinned `host`, with `event` recorded after it; or, without an event, values
        already on the host."""
        self._host, self._event = host, event
        self.is_read = False  # tolist() was called: the host memory the copy landed in may be reused

    @classmethod
    def start(cls, tensor: torch.Tensor) -> DeviceToHost:
        """Queues the copy of tensor to new pinned memory on torch's current stream (a CPU tensor is taken as it
        is)."""
        if tensor.device.type != "cuda":
            return cls(tensor)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    def wait(self) -> None:
        """Blocks until the copy has landed (releasing the interpreter lock meanwhile)."""
        if self._event is not None:
            self._event.synchronize()

    def tensor(self) -> torch.Tensor:
        self.wait()
        return self._host

    def tolist(self) -> list[Any]:
        """The values, read once the copy has landed; after this the host memory is the sender's again."""
        values: list[Any] = self.tensor().tolist()
        self.is_read = True
        return values


class HeldLockCopies:
    """Asynchronous copies between pinned host memory and the device, and event records, queued on torch's current
    stream through the CUDA driver without letting the interpreter lock go (ctypes.PyDLL). Each call takes a few
    microseconds. The torch calls that queue the same let the lock go, and a thread that competes for it (the
    worker's masks thread beside its step thread and event loop) can wait longer to take it back than the call took
    (docs/structured-output.md). The calling thread must have the device's context current (torch.cuda.set_device)."""

    def __init__(self) -> None:
        self._to_device = driver_function("cuMemcpyHtoDAsync_v2", ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_void_p)
        self._to_host = driver_function("cuMemcpyDtoHAsync_v2", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                                        ctypes.c_void_p)
        self._record = driver_function("cuEventRecord", ctypes.c_void_p, ctypes.c_void_p)

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Queues destination <- source: contiguous tensors of the same bytes, one on the current device, the other
        on the host in pinned memory (not checked: asking torch lets the lock go; from pageable memory the copy is
        still right, only not asynchronous)."""
        size = source.numel() * source.element_size()
        if not (destination.is_contiguous() and source.is_contiguous()) or (
                destination.numel() * destination.element_size() != size):
            raise ValueError(f"copies need contiguous tensors of the same bytes, got {destination.shape} "
                             f"{destination.dtype} and {source.shape} {source.dtype}")
        stream = torch.cuda.current_stream().cuda_stream
        if destination.is_cuda and not source.is_cuda:
            driver_call(self._to_device(destination.data_ptr(), source.data_ptr(), size, stream),
                        "cuMemcpyHtoDAsync")
        elif source.is_cuda and not destination.is_cuda:
            driver_call(self._to_host(destination.data_ptr(), source.data_ptr(), size, stream), "cuMemcpyDtoHAsync")
        else:
            raise ValueError(f"a copy goes between the host and the device, got {source.device} -> "
                             f"{destination.device}")

    def record(self, event: torch.cuda.Event) -> None:
        """Records event on the current stream; the event must have been recorded once before (torch creates an
        event's handle at its first record)."""
        if not event.cuda_event:
            raise ValueError("the event has no handle yet: record it once with torch first")
        driver_call(self._record(event.cuda_event, torch.cuda.current_stream().cuda_stream), "cuEventRecord")
