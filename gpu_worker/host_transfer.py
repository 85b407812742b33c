"""Copies between host and device that never stall the stream: the host goes on queuing work while they run."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; on a GPU an asynchronous copy from pinned memory, so it does not wait for the stream."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class DeviceToHost:
    """A device tensor on its way to the host: the copy is queued now, `tensor()` waits for it alone.

    On a GPU the copy lands in pinned memory and an event marks its end, so waiting for it does not wait for
    work queued on the stream after it (the next step's forward pass).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> None:
        """Blocks until the copy has landed (releasing the interpreter lock meanwhile)."""
        if self._event is not None:
            self._event.synchronize()

    def tensor(self) -> torch.Tensor:
        self.wait()
        return self._host
