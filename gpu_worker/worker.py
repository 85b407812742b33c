"""The worker core: loaded model, KV pools, sequence registry and model runner behind three calls."""

from __future__ import annotations

import threading
import time

import structlog
import torch

from pagedserve.gpu_worker.config import DType, WorkerConfig
from pagedserve.gpu_worker.cuda_graph import CudaGraphRunner
from pagedserve.gpu_worker.errors import CacheNotInitializedError, InvalidCacheRequestError
from pagedserve.gpu_worker.kv_pool import KVLayout, KVPool
from pagedserve.gpu_worker.memory_profile import gpu_blocks_for_budget, profile_peak_activation_bytes
from pagedserve.gpu_worker.model_runner import ModelRunner
from pagedserve.gpu_worker.sampler import Sampler
from pagedserve.gpu_worker.sequence_state import SequenceRegistry
from pagedserve.gpu_worker.step import CacheInfo, CacheRequest, StepRequest, StepResult, WorkerInfo
from pagedserve.gpu_worker.weights import LoadedModel, load_model
from pagedserve.kernels.ops import KernelOps, get_kernel_ops

log = structlog.get_logger()
# Larger decode batches run eagerly: launch overhead is already small next to their compute.
MAX_GRAPH_BATCH_SIZE = 512


class Worker:
    """Serves one model on one device. Calls are serialised by a lock, so steps apply strictly in order.

    Invariant: registry and runner exist exactly when the KV pool does (after init_cache).
    """

    def __init__(self, config: WorkerConfig, loaded: LoadedModel, device: torch.device, ops: KernelOps) -> None:
        self.config = config
        self.loaded = loaded
        self.device = device
        self.ops = ops
        self._lock = threading.Lock()
        self._last_forward_end_s: float | None = None
        self._pool: KVPool | None = None
        self._registry: SequenceRegistry | None = None
        self._runner: ModelRunner | None = None

    @classmethod
    def load(cls, config: WorkerConfig) -> Worker:
        """Resolves the device, picks its attention ops and loads the model's weights."""
        device = config.device.resolve()
        ops = get_kernel_ops(device)
        loaded = load_model(config.model_dir, config.dtype, device, config.load_format, config.seed, ops)
        return cls(config, loaded, device, ops)

    @property
    def is_cache_initialized(self) -> bool:
        return self._pool is not None

    @property
    def registry(self) -> SequenceRegistry:
        if self._registry is None:
            raise CacheNotInitializedError("InitCache must run before Execute")
        return self._registry

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise CacheNotInitializedError("InitCache must run before Execute")
        return self._runner

    @property
    def pool(self) -> KVPool:
        if self._pool is None:
            raise CacheNotInitializedError("InitCache must run before Execute")
        return self._pool

    def info(self) -> WorkerInfo:
        model_config = self.loaded.config
        layout = self._layout(block_size=1)
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        return WorkerInfo(
            worker_id=self.config.worker_id,
            model=self.loaded.name,
            architecture=model_config.architecture.value,
            dtype=DType.from_torch(self.loaded.dtype).value,
            device=str(self.device),
            vocab_size=model_config.vocab_size,
            max_position_embeddings=model_config.max_position_embeddings,
            weight_bytes=self.loaded.weight_bytes,
            kv_bytes_per_token=layout.bytes_per_token,
            total_memory_bytes=total,
            is_cache_initialized=self.is_cache_initialized,
        )

    def init_cache(self, request: CacheRequest) -> CacheInfo:
        """Drops every sequence and the old pools, sizes and allocates new ones."""
        with self._lock:
            self._pool = self._registry = self._runner = None
            self._last_forward_end_s = None
            layout = self._layout(request.block_size)
            num_gpu_blocks, peak_bytes = self._size_gpu_pool(layout, request)
            num_cpu_blocks = layout.num_blocks_in(request.swap_space_bytes)
            pool = KVPool(layout, num_gpu_blocks, num_cpu_blocks, self.device, self.ops)
            sampler = Sampler(self.loaded.config.vocab_size, self.device, self.config.seed)
            registry = SequenceRegistry(layout.block_size, num_gpu_blocks, num_cpu_blocks)
            graph_runner = self._capture_graphs(pool, request)
            self._pool, self._registry = pool, registry
            self._runner = ModelRunner(self.loaded.model, pool, registry.tables, sampler, graph_runner)
        log.info("cache_initialized", num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks,
                 block_size=layout.block_size, peak_activation_bytes=peak_bytes)
        return CacheInfo(num_gpu_blocks, num_cpu_blocks, peak_bytes)

    def execute(self, step: StepRequest) -> StepResult:
        """Validates the whole step, then applies it: drop, swap out, swap in, copy, add, update, compute."""
        started = time.perf_counter()
        with self._lock:
            registry, pool, runner = self.registry, self.pool, self.runner
            registry.validate(step)
            work = registry.apply(step)
            pool.swap_out(step.swap_out)
            pool.swap_in(step.swap_in)
            pool.copy_blocks(step.block_copies)
            forward_started = time.perf_counter()
            results = runner.run(work)
            forward_ended = time.perf_counter()
            registry.commit(work, {r.seq_id: r for r in results})
            idle_s = forward_started - (self._last_forward_end_s or forward_started)
            self._last_forward_end_s = forward_ended
        return StepResult(step.step_id, tuple(results), (time.perf_counter() - started) * 1e3,
                          (forward_ended - forward_started) * 1e3, idle_s * 1e3)

    def _capture_graphs(self, pool: KVPool, request: CacheRequest) -> CudaGraphRunner | None:
        """Decode graphs for up to max_num_seqs sequences of up to max_model_len tokens, on CUDA."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        max_model_len = min(request.max_model_len or self.loaded.config.max_position_embeddings,
                            self.loaded.config.max_position_embeddings)
        max_blocks = -(-max_model_len // pool.block_size)
        runner = CudaGraphRunner(self.loaded.model, pool.gpu_cache, pool.block_size,
                                 min(request.max_num_seqs, MAX_GRAPH_BATCH_SIZE), max_blocks)
        runner.capture()
        return runner

    def _layout(self, block_size: int) -> KVLayout:
        model_config = self.loaded.config
        return KVLayout(
            model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, block_size, self.loaded.dtype
        )

    def _size_gpu_pool(self, layout: KVLayout, request: CacheRequest) -> tuple[int, int]:
        """(device blocks, profiled peak activation bytes): the override, the CPU byte budget, or profiling."""
        if request.num_gpu_blocks_override is not None:
            return request.num_gpu_blocks_override, 0
        if self.device.type != "cuda":
            if request.kv_cache_memory_bytes < layout.bytes_per_block:
                raise InvalidCacheRequestError(
                    f"kv_cache_memory_bytes {request.kv_cache_memory_bytes} holds no block of "
                    f"{layout.bytes_per_block} bytes"
                )
            return layout.num_blocks_in(request.kv_cache_memory_bytes), 0
        peak_bytes = profile_peak_activation_bytes(
            self.loaded.model, layout, request.max_num_batched_tokens, request.max_num_seqs, self.device
        )
        return gpu_blocks_for_budget(layout, request.gpu_memory_utilization, peak_bytes, self.device), peak_bytes
