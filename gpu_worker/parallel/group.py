"""The ranks of one tensor-parallel group and their collectives: NCCL on CUDA devices, gloo on the CPU.

Each rank holds two process groups over one rendezvous store: the device group, for the forward pass's all-reduces
and all-gathers (NCCL on a GPU, so they can be captured in CUDA graphs; gloo on the CPU), and a gloo host group
for what travels between the hosts' memories (the leader's commands, the pool size all ranks agree on). Both are
built from backend objects rather than torch.distributed's process-global default group, so that several ranks can
live in one process (the CPU tests run a group on threads).
"""

from __future__ import annotations

import datetime
import os
from typing import Protocol, cast

import structlog
import torch
import torch._C._distributed_c10d as c10d

from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig
from pagedserve.gpu_worker.parallel.rendezvous import RENDEZVOUS_TIMEOUT_S, Rendezvous, gloo_group, meet

log = structlog.get_logger()

_LOADED_KEY = "loaded"


class Collectives(Protocol):
    """The methods of a torch c10d backend (ProcessGroupGloo, ProcessGroupNCCL) used here; torch's stubs declare
    them on ProcessGroup only, though every backend has them."""

    def allreduce(self, tensors: list[torch.Tensor], opts: c10d.AllreduceOptions = ...) -> c10d.Work: ...

    def broadcast(self, tensors: list[torch.Tensor], opts: c10d.BroadcastOptions = ...) -> c10d.Work: ...

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor) -> c10d.Work: ...


class ParallelGroup:
    """This rank's view of its group. With size 1 every collective is the identity and no process group exists.

    Invariant: every rank calls the same collectives in the same order with the same shapes; the model and the
    worker guarantee it by running the same steps.
    """

    def __init__(self, rank: int, size: int, device_group: Collectives | None = None,
                 host_group: Collectives | None = None, rendezvous: Rendezvous | None = None) -> None:
        self.rank = rank
        self.size = size
        self._device_group = device_group
        self._host_group = host_group
        self._rendezvous = rendezvous

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums tensor over the ranks, in place; returns it. tensor: any shape, contiguous, on the device."""
        if self._device_group is not None:
            self._device_group.allreduce([tensor]).wait()
        return tensor

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor: [rows, cols] on every rank -> [rows, size * cols], rank r's columns at r * cols."""
        if self._device_group is None:
            return tensor
        rows, cols = tensor.shape
        gathered = torch.empty(self.size * rows, cols, dtype=tensor.dtype, device=tensor.device)
        self._device_group._allgather_base(gathered, tensor.contiguous()).wait()
        return gathered.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (the pool size all ranks can hold)."""
        if self._host_group is None:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        options = c10d.AllreduceOptions()
        options.reduceOp = c10d.ReduceOp(c10d.ReduceOp.MIN)
        self._host_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def broadcast_from_leader(self, buffer: torch.Tensor) -> None:
        """buffer: [n] uint8 on the CPU, the leader's copied into every other rank's (the same n on every rank)."""
        if self._host_group is None:
            return
        options = c10d.BroadcastOptions()
        options.rootRank = 0
        self._host_group.broadcast([buffer], options).wait()

    def wait_until_all_loaded(self) -> None:
        """Returns once every rank has called it (after loading its weights), within RENDEZVOUS_TIMEOUT_S: ranks
        load at their own pace, so this waits on the store rather than in a collective with a short timeout."""
        if self._rendezvous is None:
            return
        store = self._rendezvous.store
        store.set(f"{_LOADED_KEY}/{self.rank}", "1")
        store.wait([f"{_LOADED_KEY}/{rank}" for rank in range(self.size)],
                   datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


SINGLE_RANK = ParallelGroup(0, 1)


def join_group(config: TensorParallelConfig, device: torch.device) -> ParallelGroup:
    """Joins the group at config.rendezvous (the leader hosts the store there); SINGLE_RANK for size 1. Raises
    ModelLoadError when the other ranks do not arrive within RENDEZVOUS_TIMEOUT_S."""
    if config.size == 1:
        return SINGLE_RANK
    if device.type == "cpu":
        # The ranks of a CPU group share the host's cores: each with a thread per core, their OpenMP threads spin
        # against each other while a rank blocks in a collective (a step took 27x longer with 2 ranks on 2 cores).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // config.size))
    timeout = datetime.timedelta(seconds=config.timeout_s)
    try:
        rendezvous = meet(config)
        host_group = cast(Collectives, gloo_group(rendezvous, "host", config, timeout))
        device_group = _device_group(rendezvous, config, device, timeout)
    except (RuntimeError, OSError) as error:  # DistStoreError is a RuntimeError: a rank never came
        raise ModelLoadError(f"tensor-parallel rendezvous at {config.rendezvous} failed: {error}") from error
    log.info("tensor_parallel_group_joined", tp_rank=config.rank, tp_size=config.size, device=str(device),
             backend="nccl" if device.type == "cuda" else "gloo", num_threads=torch.get_num_threads())
    return ParallelGroup(config.rank, config.size, device_group, host_group, rendezvous)


def rank_device(device: torch.device, config: TensorParallelConfig) -> torch.device:
    """The device of this rank: on a host whose process sees several GPUs, rank r takes GPU r modulo their count
    (a launcher that gives each rank one GPU through CUDA_VISIBLE_DEVICES leaves it GPU 0)."""
    if device.type != "cuda" or config.size == 1:
        return device
    ranked = torch.device("cuda", config.rank % torch.cuda.device_count())
    torch.cuda.set_device(ranked)
    return ranked


def _device_group(rendezvous: Rendezvous, config: TensorParallelConfig, device: torch.device,
                  timeout: datetime.timedelta) -> Collectives:
    if device.type != "cuda":
        return cast(Collectives, gloo_group(rendezvous, "device", config, timeout))
    options = c10d.ProcessGroupNCCL.Options()  # ProcessGroupNCCL is absent from CPU builds of torch
    options._timeout = timeout
    store = c10d.PrefixStore("device", rendezvous.store)
    return cast(Collectives, c10d.ProcessGroupNCCL(store, config.rank, config.size, options))
