"""The worker core: loaded model, KV pools, sequence registry and model runner behind three calls."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import structlog
import torch

from pagedserve.contract.model_format import KVCacheDType
from pagedserve.contract.step import StepPlan, StepResult
from pagedserve.contract.worker_info import CacheInfo, CacheRequest, WorkerInfo
from pagedserve.gpu_worker.bad_words import BadWordsTokenizer
from pagedserve.gpu_worker.config import WorkerConfig
from pagedserve.gpu_worker.cuda_graph import CudaGraphRunner
from pagedserve.gpu_worker.device_span import DeviceSpan
from pagedserve.gpu_worker.devices import dtype_from_torch, resolve_device
from pagedserve.gpu_worker.errors import CacheNotInitializedError, InvalidCacheRequestError, ModelLoadError
from pagedserve.gpu_worker.fp8_kv_scales import calibrate_kv_scales
from pagedserve.gpu_worker.fp8_support import require_fp8_device
from pagedserve.gpu_worker.grammar import GrammarCompiler
from pagedserve.gpu_worker.kv_pool import KVLayout, KVPool
from pagedserve.gpu_worker.launched_step import LaunchedStep
from pagedserve.gpu_worker.memory_profile import (
    blocks_in_bytes,
    gpu_blocks_for_budget,
    gpu_blocks_for_bytes,
    profile_peak_activation_bytes,
)
from pagedserve.gpu_worker.model_runner import MaskedRows, ModelRunner, RowsAtLaunch
from pagedserve.gpu_worker.parallel.commands import GroupLeader, fatal_in_group
from pagedserve.gpu_worker.parallel.group import SINGLE_RANK, ParallelGroup, join_group, rank_device
from pagedserve.gpu_worker.piecewise_graph import MAX_PIECEWISE_TOKENS, PiecewiseGraphRunner
from pagedserve.gpu_worker.sampler import Sampler
from pagedserve.gpu_worker.sequence_state import ScheduledWork, SequenceRegistry
from pagedserve.gpu_worker.weights import LoadedModel, load_model
from pagedserve.kernels.fp8 import FP8_DTYPE
from pagedserve.kernels.ops import KernelOps, get_kernel_ops

log = structlog.get_logger()
# Decode batches up to vLLM's largest offline max_num_seqs replay graphs: the host time of an eager step's
# ~180 launches (5-7 ms) would hold up the step pipeline, whose host stages must keep ahead of the device.
MAX_GRAPH_BATCH_SIZE = 1024


class Worker:
    """Serves one model on one device. Calls are serialised by a lock, so steps apply strictly in order.

    A step is launched (validated, recorded, queued on the device) and later finished (its tokens read back),
    in launch order; step N+1 may be launched before step N finishes, so the device never waits for the host
    to read tokens: inputs that are step N's tokens are read on the device.

    Invariant: registry and runner exist exactly when the KV pool does (after init_cache).

    Under tensor parallelism the worker is one rank of a group: the leader (rank 0, with a GroupLeader) announces
    each init_cache, step and release to the other ranks before running it, and they run it too (follower.py).
    """

    def __init__(self, config: WorkerConfig, loaded: LoadedModel, device: torch.device, ops: KernelOps,
                 group: ParallelGroup = SINGLE_RANK) -> None:
        self.config = config
        self.loaded = loaded
        self.device = device
        self.ops = ops
        self.group = group
        self._lock = threading.Lock()
        self._leader = GroupLeader(group, self._lock) if group.size > 1 and group.is_leader else None
        self._in_flight: deque[LaunchedStep] = deque()
        # Deferred samplings: their token masks, then their queueing on the device (launched_step.py).
        self._deferred = ThreadPoolExecutor(1, thread_name_prefix="worker-masks", initializer=_use_device,
                                            initargs=(device,))
        self._last_span: DeviceSpan | None = None
        self._pool: KVPool | None = None
        self._registry: SequenceRegistry | None = None
        self._runner: ModelRunner | None = None
        # From the model directory's tokenizer.json (None without one): structured output and bad_words need it.
        self.grammars = GrammarCompiler.for_model(config.model_dir, loaded.config.vocab_size)
        self.bad_words = BadWordsTokenizer.for_model(config.model_dir)

    @classmethod
    def load(cls, config: WorkerConfig) -> Worker:
        """Resolves the device, joins the tensor-parallel group (if any), picks its attention ops and loads the
        model's weights (this rank's slices); returns once every rank of the group has loaded."""
        device = rank_device(resolve_device(config.device), config.tensor_parallel)
        if config.kv_cache_dtype is KVCacheDType.FP8:
            require_fp8_device(device, "--kv-cache-dtype fp8")
        if config.batch_invariant and device.type != "cpu":
            raise ModelLoadError(f"--batch-invariant needs the CPU worker (--device cpu): on {device.type} the "
                                 "kernels round by the number of rows a step gives them")
        group = join_group(config.tensor_parallel, device)
        ops = get_kernel_ops(device, dependent_launch=config.dependent_launch, batch_invariant=config.batch_invariant)
        loaded = load_model(config.model_dir, config.dtype, device, config.load_format, config.seed, ops,
                            config.quantization, group, quantize_lm_head=config.quantize_lm_head)
        if config.kv_cache_dtype is KVCacheDType.FP8:
            calibrate_kv_scales(loaded.model, device, config.seed)
        group.wait_until_all_loaded()
        return cls(config, loaded, device, ops, group)

    def close(self) -> None:
        """A leader tells its followers to stop; nothing to do alone or as a follower."""
        if self._leader is not None:
            self._leader.stop()
        self._deferred.shutdown(wait=False, cancel_futures=True)

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
            dtype=dtype_from_torch(self.loaded.dtype).value,
            device=str(self.device),
            vocab_size=model_config.vocab_size,
            max_position_embeddings=model_config.max_position_embeddings,
            weight_bytes=self.loaded.weight_bytes,
            kv_bytes_per_token=layout.bytes_per_token,
            total_memory_bytes=total,
            is_cache_initialized=self.is_cache_initialized,
        )

    def init_cache(self, request: CacheRequest) -> CacheInfo:
        """Drops every sequence and the old pools, sizes and allocates new ones (under tensor parallelism: the
        size every rank can hold)."""
        self._await_deferred_samplings()
        with self._lock:
            if self._leader is not None:
                self._leader.init_cache(request)
            self._drop_cache()
            layout = self._layout(request.block_size)
            # The sampler loads its kernels as it is made: their code takes device memory the sizing must see.
            sampler = Sampler(self.loaded.config.vocab_size, self.device, self.config.seed, self.grammars, self.ops,
                              self.loaded.dtype)
            num_gpu_blocks, peak_bytes = self._agreed_gpu_pool_size(layout, request)
            num_cpu_blocks = self.group.min_over_ranks(layout.num_blocks_in(request.swap_space_bytes))
            with fatal_in_group(self.group, "allocating the KV cache"):
                pool = KVPool(layout, num_gpu_blocks, num_cpu_blocks, self.device, self.ops)
            registry = SequenceRegistry(layout.block_size, num_gpu_blocks, num_cpu_blocks, self.grammars,
                                        self.bad_words)
            with fatal_in_group(self.group, "capturing CUDA graphs"):
                graph_runner, piece_runner = self._capture_graphs(pool, request)
            self._pool, self._registry = pool, registry
            self._runner = ModelRunner(self.loaded.model, pool, registry.tables, sampler, graph_runner, piece_runner)
        log.info("cache_initialized", num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks,
                 block_size=layout.block_size, peak_activation_bytes=peak_bytes)
        return CacheInfo(num_gpu_blocks, num_cpu_blocks, peak_bytes)

    def release_cache(self) -> None:
        """Drops every sequence, the KV pools and the graphs, once the steps in flight are done: the worker is as
        loaded, and steps fail with CacheNotInitializedError until init_cache runs again."""
        self._await_deferred_samplings()
        with self._lock:
            if self._leader is not None:
                self._leader.release_cache()
            had_cache = self._pool is not None
            self._drop_cache()
            if had_cache and self.device.type == "cuda":
                torch.cuda.empty_cache()  # the pools' and graphs' memory goes back to the device, not to our cache
        if had_cache:
            log.info("cache_released")

    def _drop_cache(self) -> None:
        """Under the lock, their deferred samplings done: waits for the steps in flight and forgets them, then drops
        pools, registry and runner."""
        for launched in self._in_flight:
            try:
                self._resolve(launched)
            except Exception as error:  # the step is dropped with the cache; its stream has ended or fails with it
                log.warning("dropped_step_failed", step_id=launched.step_id, error=repr(error))
        self._in_flight.clear()
        self._pool = self._registry = self._runner = None
        self._last_span = None

    def execute(self, step: StepPlan) -> StepResult:
        """Launches the step and waits for its result (for callers that keep one step in flight)."""
        return self.finish(self.launch(step))

    def launch(self, step: StepPlan) -> LaunchedStep:
        """Validates the whole step, then applies it: drop, swap out, swap in, copy, add, update, and queues its
        forward pass and sampling on the device (a sampling that reads earlier tokens on the host is deferred, see
        launched_step.py). Raises InvalidStepError, or the failure of an earlier step's deferred sampling, before
        changing anything."""
        started = time.perf_counter()
        for earlier in list(self._in_flight):  # without the lock: their samplings' thread and finish() take it
            earlier.sampling_queued()  # this step's inputs may read their tokens on the device
        with self._lock:
            registry, pool, runner = self.registry, self.pool, self.runner
            registry.validate(step)
            if self._leader is not None:
                self._leader.step(step)
            with fatal_in_group(self.group, f"launching step {step.step_id}"):
                work = registry.apply(step)
                deferred_rows = RowsAtLaunch.of(work) if _reads_token_history(work) else None
                # Started now, the token masks are computed while this thread queues the forward pass.
                token_masks = self._start_token_masks(list(self._in_flight), deferred_rows)
                span = DeviceSpan(self.device)
                pool.swap_out(step.swap_out)
                pool.swap_in(step.swap_in)
                pool.copy_blocks(step.block_copies)
                run = runner.launch(work, deferred_rows)
                pending = registry.reserve(work)
                index = runner.last_token_index(run, [slot.state.table_row for slot in pending])
                launched = LaunchedStep(step.step_id, run, pending, index, span, 0.0)
                if token_masks is None:
                    self._close_launch(launched)
                else:
                    launched.deferred_sampling = self._deferred.submit(self._sample_when_masked, token_masks, launched)
            launched.host_s = time.perf_counter() - started
            self._in_flight.append(launched)
        return launched

    def finish(self, launched: LaunchedStep) -> StepResult:
        """Waits for a launched step's tokens, writes them into the registry and returns its result. Steps are
        finished in launch order; older steps left unfinished are resolved and dropped first."""
        launched.wait()
        started = time.perf_counter()
        with self._lock:
            if launched not in self._in_flight:
                raise RuntimeError(f"step {launched.step_id} is not in flight")
            # Older steps nobody finished (their stream ended) still write their tokens, in order.
            while (oldest := self._in_flight.popleft()) is not launched:
                self._resolve(oldest)
            self._resolve(launched)
            results = launched.run.results(launched.sample)
            idle_ms = launched.span.idle_ms_since(self._last_span)
            self._last_span = launched.span
        host_ms = (launched.host_s + time.perf_counter() - started) * 1e3
        return StepResult(launched.step_id, tuple(results), host_ms, launched.span.duration_ms(), idle_ms)

    def _await_deferred_samplings(self) -> None:
        """Waits, without the lock (their thread and finish() take it meanwhile), until the deferred samplings of the
        steps in flight are queued or have failed."""
        for launched in list(self._in_flight):
            if launched.deferred_sampling is not None:
                futures.wait([launched.deferred_sampling])

    def _close_launch(self, launched: LaunchedStep) -> None:
        """The step's sampling is queued: its tokens become the sequences' last tokens on the device, and its span
        ends."""
        self.runner.keep_last_tokens(launched.run, launched.last_token_index)
        launched.span.close()

    def _start_token_masks(self, earlier: list[LaunchedStep], rows: RowsAtLaunch | None) -> Future[MaskedRows] | None:
        """_token_masks on the masks thread, for a step whose sampling is deferred and samples any row."""
        return self._deferred.submit(self._token_masks, earlier, rows) if rows is not None and rows.rows else None

    def _token_masks(self, earlier: list[LaunchedStep], rows: RowsAtLaunch) -> MaskedRows:
        """Off the step thread, from the moment a step's work is known: reads the earlier steps' tokens into the
        registry as they reach the host (their samplings are queued), then computes the rows' token masks."""
        for step in earlier:
            self._resolve(step)
        current = rows.current_rows()
        return MaskedRows(current, self.runner.sampler.token_masks(current, deferred=True))

    def _sample_when_masked(self, token_masks: Future[MaskedRows], launched: LaunchedStep) -> None:
        """On the masks thread, after _token_masks (the thread runs its tasks in order): queues the sampling as soon
        as the masks are ready, under the lock so that nothing else is queued on the device between. The next
        launch waits for this before it queues its forward pass, which may read these tokens; the control plane's
        round trip never delays a sampling."""
        masked = token_masks.result()
        with self._lock:
            self.runner.sample_deferred(launched.run, masked, launched.last_token_index)
            launched.span.close()

    def _resolve(self, launched: LaunchedStep) -> None:
        with launched.resolve_lock:
            if launched.is_resolved:
                return
            launched.sampling_queued()
            if launched.run.sample is not None:
                launched.sample = launched.run.sample.result()
                self.registry.fill(launched.pending, launched.sample.token_ids, launched.sample.no_choice)
            launched.is_resolved = True

    def _capture_graphs(
        self, pool: KVPool, request: CacheRequest
    ) -> tuple[CudaGraphRunner | None, PiecewiseGraphRunner | None]:
        """On CUDA: decode graphs for up to max_num_seqs sequences of up to max_model_len tokens, and the pieces of
        other steps of up to max_num_batched_tokens (at most MAX_PIECEWISE_TOKENS), all in one memory pool."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None, None
        max_model_len = min(request.max_model_len or self.loaded.config.max_position_embeddings,
                            self.loaded.config.max_position_embeddings)
        max_blocks = -(-max_model_len // pool.block_size)
        graph_pool = torch.cuda.graph_pool_handle()
        decode = CudaGraphRunner(self.loaded.model, pool.gpu_cache, pool.block_size,
                                 min(request.max_num_seqs, MAX_GRAPH_BATCH_SIZE), max_blocks, self.ops)
        decode.capture(graph_pool)
        pieces = PiecewiseGraphRunner(self.loaded.model, pool.gpu_cache,
                                      min(request.max_num_batched_tokens, MAX_PIECEWISE_TOKENS))
        pieces.capture(graph_pool)
        return decode, pieces

    def _layout(self, block_size: int) -> KVLayout:
        model_config = self.loaded.config
        dtype = FP8_DTYPE if self.config.kv_cache_dtype is KVCacheDType.FP8 else self.loaded.dtype
        return KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, block_size, dtype)

    def _agreed_gpu_pool_size(self, layout: KVLayout, request: CacheRequest) -> tuple[int, int]:
        """_size_gpu_pool's (blocks, peak bytes), the blocks the fewest any rank can hold: every rank sizes its own
        device, and a rank that can hold none makes every rank refuse the request alike."""
        refusal: InvalidCacheRequestError | None = None
        with fatal_in_group(self.group, "sizing the KV cache"):  # profiling runs collectives: no rank may leave
            try:
                num_blocks, peak_bytes = self._size_gpu_pool(layout, request)
            except InvalidCacheRequestError as error:
                refusal, num_blocks, peak_bytes = error, 0, 0
            agreed = self.group.min_over_ranks(num_blocks)
        if refusal is not None:
            raise refusal
        if agreed == 0:
            raise InvalidCacheRequestError("another tensor-parallel rank has no memory left for KV blocks")
        return agreed, peak_bytes

    def _size_gpu_pool(self, layout: KVLayout, request: CacheRequest) -> tuple[int, int]:
        """(device blocks, profiled peak activation bytes): the override, the CPU byte budget, or profiling. On a
        GPU, kv_cache_memory_bytes (when not 0) sizes the pool in place of gpu_memory_utilization, if it fits beside
        the profiled peak."""
        if request.num_gpu_blocks_override is not None:
            return request.num_gpu_blocks_override, 0
        if self.device.type != "cuda":
            return blocks_in_bytes(layout, request.kv_cache_memory_bytes), 0
        peak_bytes = profile_peak_activation_bytes(
            self.loaded.model, layout, request.max_num_batched_tokens, request.max_num_seqs, self.device
        )
        graph_bytes = self._graph_pool_bytes(layout, request)
        reserved_bytes = peak_bytes + graph_bytes
        if request.kv_cache_memory_bytes:
            num_blocks = gpu_blocks_for_bytes(layout, request.kv_cache_memory_bytes, reserved_bytes, self.device)
        else:
            num_blocks = gpu_blocks_for_budget(layout, request.gpu_memory_utilization, reserved_bytes, self.device)
        log.info("gpu_memory_profiled", peak_activation_bytes=peak_bytes, graph_pool_bytes=graph_bytes)
        return num_blocks, peak_bytes

    def _graph_pool_bytes(self, layout: KVLayout, request: CacheRequest) -> int:
        """Device memory the CUDA graphs hold for as long as they live, measured by capturing them over a pool of
        one block (their padding rows write no slot). The graphs keep the pool's address, so the ones that serve
        are captured again over the real pool; the probe also loads every kernel they launch before sizing.

        Counted as the driver sees it once the probe's graphs and its pool are freed, less the pool's block: the
        graphs' input buffers are small allocations that share a segment with a one-block pool, and next to the
        real pool they take a segment of their own. What stays (the kernels' modules, loaded once) is already in
        the device's used memory when the pool is sized, so it is not counted twice."""
        probe = KVPool(layout, 1, 0, self.device, self.ops)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        runners = self._capture_graphs(probe, request)
        torch.cuda.synchronize(self.device)
        free_with_graphs, _ = torch.cuda.mem_get_info(self.device)
        del runners, probe
        torch.cuda.empty_cache()
        free_without, _ = torch.cuda.mem_get_info(self.device)
        return max(free_without - free_with_graphs - layout.bytes_per_block, 0)


def _use_device(device: torch.device) -> None:
    """A worker thread's current device: kernels follow their tensors, but events record on the current device."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _reads_token_history(work: list[ScheduledWork]) -> bool:
    """Whether sampling this step reads earlier output tokens' values on the host (penalties, grammars and bad words
    do)."""
    return any(item.is_sampling and item.state.reads_token_history for item in work)
