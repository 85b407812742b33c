"""A deferred greedy sampling queued without letting the interpreter lock go.

A constrained step's sampling is queued on the worker's masks thread once its masks are filled, on the path from one
step's tokens on the host to the next step's sampling (docs/structured-output.md). Through torch that takes about ten
calls (pinned and device allocations, the masks' copy, the tokens' copy back and its event, the scatter of the tokens
where the next step reads them), and each lets the lock go: with the step thread and the event loop running Python
beside it, the masks thread then waits to take it back, about 0.6 ms a step at 64 rows. Here the buffers are the
sampler's, kept from step to step, and the sampling is four driver calls that keep the lock: the masks' copy, the
argmax (which also writes each token where the next step reads it) and the tokens' copy back (HeldLockCopies), and
the argmax's launch (a dependent launch through ctypes.PyDLL, as every kernel of the worker).

The buffers are reused only once the sampling through them before has reached the host (its result was read): the
masks thread reads every earlier step's tokens before it fills the next masks, so that is the rule; where it does not
hold the sampler takes its usual path.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from pagedserve.gpu_worker.host_transfer import DeviceToHost, HeldLockCopies
from pagedserve.kernels.token_masks import ArgmaxTargets, mask_words, scratch_words


@runtime_checkable
class ArgmaxInto(Protocol):
    """Kernel ops with the masked argmax into buffers allocated ahead (CudaKernelOps)."""

    def masked_argmax_into(self, logits: torch.Tensor, masks: torch.Tensor | None, targets: ArgmaxTargets) -> None:
        ...


class HeldLockArgmax:
    """The masked argmax of a greedy batch of up to the rows seen so far, into buffers that grow to the largest batch
    (capacity a power of two) and are kept."""

    def __init__(self, vocab_size: int, device: torch.device, ops: ArgmaxInto) -> None:
        self._vocab_size = vocab_size
        self._device = device
        self._ops = ops
        self._copies = HeldLockCopies()
        self._capacity = 0
        self._host_masks = self._masks = self._tokens = self._host_tokens = torch.empty(0)
        self._scratch: torch.Tensor | None = None
        self._done = torch.cuda.Event()
        self._last: DeviceToHost | None = None  # the copy of the last sampling queued through the buffers

    def host_masks(self, num_rows: int) -> torch.Tensor | None:
        """The pinned [num_rows, words] int32 rows to fill a batch's masks into before start(), or None while the last
        sampling through them has not been read."""
        if self._last is not None and not self._last.is_read:
            return None
        if num_rows > self._capacity:
            self._grow(num_rows)
        return self._host_masks[:num_rows]

    def owns(self, host_masks: torch.Tensor) -> bool:
        return host_masks.data_ptr() == self._host_masks.data_ptr() and self._capacity > 0

    def start(self, logits: torch.Tensor, host_masks: torch.Tensor,
              kept: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, DeviceToHost]:
        """Queues the argmax of logits [rows, vocab] under host_masks (host_masks(rows), filled); with kept (tokens,
        index) each row's token is also written at tokens[index[row]]. Returns the tokens on the device and their
        copy to the host, which is read (DeviceToHost.tolist) before the buffers are handed out again."""
        num_rows = logits.shape[0]
        masks, tokens, host_tokens = self._masks[:num_rows], self._tokens[:num_rows], self._host_tokens[:num_rows]
        self._copies.copy(masks, host_masks)
        self._ops.masked_argmax_into(logits, masks, ArgmaxTargets(tokens, self._scratch, *(kept or (None, None))))
        self._copies.copy(host_tokens, tokens)
        self._copies.record(self._done)
        self._last = DeviceToHost(host_tokens, self._done)
        return tokens, self._last

    def _grow(self, num_rows: int) -> None:
        capacity = 1 << (num_rows - 1).bit_length()
        words = mask_words(self._vocab_size)
        self._host_masks = torch.empty((capacity, words), dtype=torch.int32, pin_memory=True)
        self._masks = torch.empty((capacity, words), dtype=torch.int32, device=self._device)
        self._tokens = torch.empty(capacity, dtype=torch.int64, device=self._device)
        self._host_tokens = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        most_words = max(scratch_words(rows, self._vocab_size) for rows in range(1, capacity + 1))
        self._scratch = torch.empty(most_words, dtype=torch.int32, device=self._device) if most_words else None
        self._done.record()  # torch gives the event its handle at its first record
        self._capacity = capacity
