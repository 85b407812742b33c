"""Kernel launches through cuLaunchKernel with the interpreter lock held (GPU): they run on torch's current stream,
and a launch the driver refuses raises with the driver's error instead of passing silently."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.driver_launch import KernelLaunchError, current_stream
from pagedserve.kernels.launch_args import int64, pointer
from pagedserve.kernels.module_cache import ModuleCache
from tests.gpu_marks import NEEDS_GPU

pytestmark = NEEDS_GPU

COPY_BLOCKS = ("cache_ops.cu", "copy_blocks<unsigned int>")  # 4-byte units: float32 pools


@pytest.fixture(scope="module")
def modules() -> ModuleCache:
    return ModuleCache(torch.device("cuda", torch.cuda.current_device()))


def test_the_current_stream_is_torchs_inside_a_stream_context() -> None:
    device = torch.cuda.current_device()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert current_stream(device) == side.cuda_stream
    assert current_stream(device) == torch.cuda.current_stream().cuda_stream


def test_a_launch_on_a_side_stream_runs_there_in_order_with_torch_work(modules: ModuleCache) -> None:
    # One slab of 4 blocks of 1,024 floats; the mapping copies block 1 onto block 3.
    pool = torch.arange(4 * 1024, dtype=torch.float32, device="cuda")
    mapping = torch.tensor([[1, 3]], dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pool[1024:2048].fill_(7.0)  # queued on the side stream before the copy, which must see it
        modules.launch(modules.kernel(*COPY_BLOCKS), (1, 1, 1), (256, 1, 1),
                       [pointer(pool), pointer(pool), pointer(mapping), int64(4096), int64(4096), int64(1024)])
        pool[:1024].fill_(-1.0)
    side.synchronize()
    assert torch.equal(pool[3072:], torch.full((1024,), 7.0, device="cuda"))
    assert torch.equal(pool[:1024], torch.full((1024,), -1.0, device="cuda"))


def test_a_refused_launch_raises_with_the_drivers_error(modules: ModuleCache) -> None:
    pool = torch.zeros(1024, dtype=torch.float32, device="cuda")
    mapping = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(KernelLaunchError, match=r"CUDA_ERROR_INVALID_VALUE .*block \(4096, 1, 1\)"):
        modules.launch(modules.kernel(*COPY_BLOCKS), (1, 1, 1), (4096, 1, 1),
                       [pointer(pool), pointer(pool), pointer(mapping), int64(1024), int64(1024), int64(1024)])
    torch.cuda.synchronize()  # the refusal left no error behind for later work
    assert torch.equal(pool, torch.zeros(1024, device="cuda"))
