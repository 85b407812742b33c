"""A tensor-parallel worker group on threads of the test process: the leader is driven, followers run their loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pagedserve.contract.model_format import DeviceKind, DType
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.gpu_worker.parallel.follower import run_follower
from pagedserve.gpu_worker.worker import Worker
from pagedserve.runtime.port_check import free_loopback_port
from tests.gpu_worker.harness import load_worker

# Collectives of a group on threads of one busy 2-core machine can be slow, never this slow.
TIMEOUT_S = 60.0


@contextmanager
def leader_of_group(model_dir: Path, size: int, block_size: int = 4, num_blocks: int = 256,
                    num_cpu_blocks: int = 0, dtype: DType = DType.FLOAT32,
                    device: DeviceKind = DeviceKind.CPU) -> Iterator[Worker]:
    """The leader of a group of size ranks (CPU and float32 unless told; on CUDA rank r takes GPU r) with its cache
    initialised as load_worker does; size 1 is a lone worker. The followers stop when the block exits."""
    rendezvous = f"127.0.0.1:{free_loopback_port()}"

    def follow(rank: int) -> None:
        config = WorkerConfig(model_dir=model_dir, dtype=dtype, device=device,
                              tensor_parallel=TensorParallelConfig(rank, size, rendezvous, TIMEOUT_S))
        run_follower(Worker.load(config))

    num_threads = torch.get_num_threads()  # a CPU group's ranks use fewer each (parallel/group.py)
    followers = [threading.Thread(target=follow, args=(rank,), name=f"tp-rank-{rank}") for rank in range(1, size)]
    for follower in followers:
        follower.start()
    leader_config = TensorParallelConfig(0, size, rendezvous, TIMEOUT_S) if size > 1 else None
    leader = load_worker(model_dir, block_size=block_size, num_blocks=num_blocks, num_cpu_blocks=num_cpu_blocks,
                         dtype=dtype, device=device, tensor_parallel=leader_config)
    try:
        yield leader
    finally:
        leader.close()
        for follower in followers:
            follower.join()
        torch.set_num_threads(num_threads)
