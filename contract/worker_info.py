"""What a worker says about itself and its cache, and how the control plane asks it to size the cache."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.contract.errors import InvalidArgumentError


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What GetWorkerInfo reports."""

    worker_id: str
    model: str
    architecture: str
    dtype: str  # the resolved weight dtype, e.g. "bfloat16"
    device: str  # e.g. "cuda:0"
    vocab_size: int
    max_position_embeddings: int
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    total_memory_bytes: int = 0
    is_cache_initialized: bool = False


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """InitCache arguments: block geometry and how much memory the pools may take."""

    block_size: int  # tokens per block, a power of two
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int = 0  # a CPU worker's pool size (0: its default)
    swap_space_bytes: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise InvalidArgumentError("block_size", f"must be a power of two, got {self.block_size}")


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What InitCache allocated."""

    num_gpu_blocks: int
    num_cpu_blocks: int
    peak_activation_bytes: int = 0
