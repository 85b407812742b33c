"""A deferred greedy sampling queued through the driver: the copies land what torch's would, the argmax equals the
torch reference and keeps each token at its index, and the buffers are handed out again only once the sampling
through them has been read (GPU)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.gpu_worker.held_lock_argmax import ArgmaxInto, HeldLockArgmax
from pagedserve.gpu_worker.host_transfer import DeviceToHost, HeldLockCopies
from pagedserve.kernels.ops import get_kernel_ops
from pagedserve.kernels.reference import TorchReferenceOps
from pagedserve.kernels.token_masks import mask_words
from tests.gpu_marks import NEEDS_GPU

pytestmark = NEEDS_GPU
VOCAB_SIZE = 128256


def _held() -> HeldLockArgmax:
    ops = get_kernel_ops(torch.device("cuda"))
    assert isinstance(ops, ArgmaxInto)
    return HeldLockArgmax(VOCAB_SIZE, torch.device("cuda"), ops)


def _random_masks(num_rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (num_rows, mask_words(VOCAB_SIZE)), generator=gen, dtype=torch.int64)
    return (words & torch.randint(-(2**31), 2**31, words.shape, generator=gen, dtype=torch.int64)).to(torch.int32)


def test_copies_through_the_driver_land_what_was_sent() -> None:
    copies = HeldLockCopies()
    sent = torch.randint(-(2**62), 2**62, (1000,), dtype=torch.int64).pin_memory()
    on_device = torch.empty(1000, dtype=torch.int64, device="cuda")
    back = torch.zeros(1000, dtype=torch.int64).pin_memory()
    event = torch.cuda.Event()
    event.record()
    copies.copy(on_device, sent)
    copies.copy(back, on_device)
    copies.record(event)
    event.synchronize()
    assert torch.equal(back, sent)
    assert torch.equal(on_device.cpu(), sent)


def test_copies_refuse_mismatched_bytes_and_an_event_without_a_handle() -> None:
    copies = HeldLockCopies()
    with pytest.raises(ValueError, match="same bytes"):
        copies.copy(torch.empty(4, device="cuda"), torch.empty(8).pin_memory())
    with pytest.raises(ValueError, match="between the host and the device"):
        copies.copy(torch.empty(4), torch.empty(4))
    with pytest.raises(ValueError, match="no handle yet"):
        copies.record(torch.cuda.Event())


@pytest.mark.parametrize("num_rows", [1, 3, 64, 70])
def test_the_argmax_equals_the_reference_and_keeps_its_tokens(num_rows: int) -> None:
    held = _held()
    logits = torch.randn(num_rows, VOCAB_SIZE, generator=torch.Generator().manual_seed(num_rows)).cuda()
    masks = _random_masks(num_rows, seed=num_rows)
    host_masks = held.host_masks(num_rows)
    assert host_masks is not None and held.owns(host_masks)
    host_masks.copy_(masks)
    kept = torch.full((num_rows + 5,), -1, dtype=torch.int64, device="cuda")
    index = torch.arange(num_rows, dtype=torch.int64, device="cuda").flip(0) + 5
    tokens, transfer = held.start(logits.bfloat16(), host_masks, (kept, index))
    assert held.host_masks(num_rows) is None  # not read yet: the masks' rows may still be on their way
    expected = TorchReferenceOps().masked_argmax(logits.bfloat16().float().cpu(), masks)
    assert transfer.tolist() == expected.tolist()
    assert tokens.tolist() == expected.tolist()
    assert kept.tolist() == [-1] * 5 + expected.flip(0).tolist()
    assert held.host_masks(num_rows) is not None


def test_buffers_grow_for_a_larger_batch_and_still_serve_a_smaller_one() -> None:
    held = _held()
    for num_rows in (2, 40, 5):
        host_masks = held.host_masks(num_rows)
        assert host_masks is not None and tuple(host_masks.shape) == (num_rows, mask_words(VOCAB_SIZE))
        masks = _random_masks(num_rows, seed=100 + num_rows)
        host_masks.copy_(masks)
        logits = torch.randn(num_rows, VOCAB_SIZE, generator=torch.Generator().manual_seed(num_rows)).cuda()
        _, transfer = held.start(logits, host_masks, None)
        assert isinstance(transfer, DeviceToHost)
        assert transfer.tolist() == TorchReferenceOps().masked_argmax(logits.cpu(), masks).tolist()
