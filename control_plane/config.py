"""Frozen configuration of the control plane's components, validated on construction."""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.runtime.logs import LogFormat, LogLevel


class SchedulingPolicy(enum.Enum):
    """Order in which waiting requests are admitted."""

    FCFS = "fcfs"  # arrival order
    PRIORITY = "priority"  # lower priority value first, then arrival order


class PreemptionMode(enum.Enum):
    """What happens to a running request evicted for lack of KV blocks."""

    RECOMPUTE = "recompute"  # free its blocks; recompute its tokens when it resumes
    SWAP = "swap"  # move its blocks to the CPU pool; move them back when it resumes


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits and policies of one worker's scheduler (vLLM's defaults)."""

    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # running sequences at once
    max_model_len: int | None = None  # prompt + output tokens per sequence; None: set from the model
    max_num_waiting: int | None = None  # admission queue bound; None: unbounded
    scheduling_policy: SchedulingPolicy = SchedulingPolicy.FCFS
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    enable_chunked_prefill: bool = True  # split a prefill that does not fit the step's budget
    long_prefill_token_threshold: int = 0  # most prefill tokens per sequence per step; 0: no cap

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.max_num_waiting is not None and self.max_num_waiting <= 0:
            raise ValueError(f"max_num_waiting must be positive, got {self.max_num_waiting}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}"
            )
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            # Without chunking a prompt must fit one step, or the longest prompts could never run.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled"
            )


def offline_step_budget(device_memory_bytes: int) -> int:
    """max_num_batched_tokens of the offline LLM API when its caller gives no scheduler config, as vLLM's LLM class
    chooses it: nobody waits on a first token there, and larger steps run the prompts' matmuls at a higher rate and
    share each step's fixed costs among more tokens. 16,384 tokens on devices of 70 GiB or more, else 8,192 (a CPU
    worker reports no device memory; vLLM also keeps an A100 at 8,192, but workers do not report their device's
    name). On the H200, 1,000 prompts of the 1B shape, 16,384 against the server's 2,048: +11.6 %, +1.1 % and
    +4.1 % output tokens/s in three pairs (19,830-20,754). vLLM's LLM also runs 1,024 sequences there; that measured
    slower here (19,817 against 20,754) and is not taken
    (benchmarks/results/2026-12-03-offline-step-budget-nvidia-h200-a5e767f.md)."""
    return 16384 if device_memory_bytes >= LARGE_DEVICE_MEMORY_BYTES else 8192


LARGE_DEVICE_MEMORY_BYTES = 70 << 30  # vLLM's threshold for its larger defaults (H100, H200, MI300X)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Shape and sizing of the paged KV cache and of the prefix cache."""

    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # share of device memory for weights, activations and KV blocks
    num_gpu_blocks_override: int | None = None  # exact device pool size (skips profiling)
    kv_cache_memory_bytes: int | None = None  # KV pool per worker; None: by device (for_worker)
    swap_space_bytes: int | None = None  # CPU memory for swapped-out blocks, per worker; None: by device (for_worker)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override <= 0:
            raise ValueError(f"num_gpu_blocks_override must be positive, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 0:
            raise ValueError(f"kv_cache_memory_bytes must be >= 0, got {self.kv_cache_memory_bytes}")
        if self.swap_space_bytes is not None and self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")

    def for_worker(self, device: str, kv_bytes_per_token: int, max_num_seqs: int, max_model_len: int) -> CacheConfig:
        """This config with the sizes left to the device filled in. A CPU worker's KV pool holds what max_num_seqs
        sequences of max_model_len tokens need, at most CPU_KV_CACHE_CAP_BYTES unless one sequence alone needs more
        (a server must take a request of max_model_len tokens), and it swaps nowhere: its swap space would be the
        same memory again. A GPU worker's pool is sized by gpu_memory_utilization unless kv_cache_memory_bytes is
        given; it keeps vLLM's 4 GiB of swap."""
        is_cpu = not device.startswith("cuda")
        kv_bytes = self.kv_cache_memory_bytes
        if kv_bytes is None and is_cpu:
            one_sequence_bytes = kv_bytes_per_token * max_model_len
            kv_bytes = min(one_sequence_bytes * max_num_seqs, max(CPU_KV_CACHE_CAP_BYTES, one_sequence_bytes))
        elif kv_bytes is None:
            kv_bytes = 0
        swap_bytes = self.swap_space_bytes
        if swap_bytes is None:
            swap_bytes = 0 if is_cpu else GPU_SWAP_SPACE_BYTES
        return replace(self, kv_cache_memory_bytes=kv_bytes, swap_space_bytes=swap_bytes)


# A CPU worker's KV pool by default, unless one sequence of max_model_len needs more: the built-in model's 4 KiB per
# token make 65,536 tokens (32 sequences of its 2,048); --kv-cache-memory gives more, --max-model-len less.
CPU_KV_CACHE_CAP_BYTES = 256 << 20
GPU_SWAP_SPACE_BYTES = 4 << 30  # vLLM's --swap-space default


# Each step in flight may compute one token past a stop that is not known yet; deeper pipelines only waste work.
MAX_STEPS_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine loop drives its workers."""

    # Steps planned ahead of the results: with 4, steps N+1 to N+3 are queued while the worker runs step N, so
    # the host round trip (reply, apply, plan, launch) may take three device steps. 1: strictly one at a time.
    max_steps_in_flight: int = 4
    # A worker whose oldest step in flight has no result this long after it could start is hung: its lane dies.
    step_timeout_s: float = 30.0
    # An INFO line at each request's admission and end (request_admitted, request_finished, request_aborted). The
    # offline LLM's default turns them off: a batch of a million prompts would print two million lines, and vLLM's
    # offline API prints none.
    log_requests: bool = True
    # Worker failures a request rides through: when its worker dies or hangs, its sequences go on on a live worker
    # whose pool holds them, computed again from their known tokens (prompt and outputs); its stream goes on. A
    # request whose worker fails once more than this, or that no live worker holds, ends with UNAVAILABLE. 0: every
    # request of a failed worker ends so. The bound keeps a request that crashes workers from crashing them all.
    worker_failure_retries: int = 1
    # With no live worker that holds it, such a request waits this long for a restarted one (while `serve` restarts
    # workers) before it ends with UNAVAILABLE; the client's stream is silent meanwhile.
    worker_failure_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps_in_flight <= MAX_STEPS_IN_FLIGHT:
            raise ValueError(
                f"max_steps_in_flight must be in [1, {MAX_STEPS_IN_FLIGHT}], got {self.max_steps_in_flight}"
            )
        if not self.step_timeout_s > 0:  # also rejects NaN
            raise ValueError(f"step_timeout_s must be positive, got {self.step_timeout_s}")
        if not self.worker_failure_wait_s > 0:  # also rejects NaN
            raise ValueError(f"worker_failure_wait_s must be positive, got {self.worker_failure_wait_s}")
        if self.worker_failure_retries < 0:
            raise ValueError(f"worker_failure_retries must be >= 0, got {self.worker_failure_retries}")


# An API key travels in a header and may come in a comma-separated list (PAGEDSERVE_API_KEY).
_API_KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation) - {","}
# The environment variable in which `serve` hands its API keys (newline-separated) to the frontend process: never on
# a command line, which `ps` shows to every user.
FRONTEND_API_KEYS_ENV = "PAGEDSERVE_FRONTEND_API_KEYS"
MAX_FRONTEND_PROCESSES = 64


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The control-plane process: where it listens and which workers it uses or starts."""

    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: Path | None = None  # None: the built-in model
    tokenizer_dir: Path | None = None  # None: model_dir's tokenizer
    worker_addresses: tuple[str, ...] = ()  # empty: start local workers
    num_workers: int = 1
    tensor_parallel_size: int = 1  # processes (GPUs) per local worker, its model sharded over them
    dtype: DType = DType.AUTO
    device: DeviceKind = DeviceKind.AUTO
    load_format: LoadFormat = LoadFormat.AUTO
    seed: int = 0
    kv_cache_dtype: KVCacheDType = KVCacheDType.AUTO  # of the local workers (external ones take their own flags)
    quantization: Quantization = Quantization.NONE  # likewise
    quantize_lm_head: bool = False  # likewise: True starts them with --quantize-lm-head
    dependent_launch: bool = True  # likewise: False starts them with --no-dependent-launch
    batch_invariant: bool = False  # likewise: True starts them with --batch-invariant (CPU workers only)
    metrics_port: int | None = None
    worker_start_timeout_s: float = 600.0
    log_format: LogFormat = LogFormat.AUTO  # of this process and of every process it starts
    log_level: LogLevel = LogLevel.INFO  # likewise
    cpu_threads: int | None = None  # torch threads of each local worker; None: runtime/cpu_threads.py's rule
    # On SIGTERM/SIGINT: how long requests in flight may run on before they are ended (Kubernetes' default grace).
    shutdown_timeout_s: float = 30.0
    # The public port: API keys a caller must send (`authorization: Bearer <key>`; none: no key needed), and TLS
    # (PEM files; a client CA also requires clients' certificates: mTLS).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # --chat-template: a file, or the template's text (vLLM's flag); None: the model's own template, if any.
    chat_template: str | None = None
    # Frontend processes sharing the public port (vLLM's --api-server-count): each streams its own clients.
    frontend_processes: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 1 <= self.frontend_processes <= MAX_FRONTEND_PROCESSES:
            raise ValueError(f"frontend_processes must be in [1, {MAX_FRONTEND_PROCESSES}], got "
                             f"{self.frontend_processes}")
        for key in self.api_keys:
            if not key or not set(key) <= _API_KEY_CHARACTERS:
                raise ValueError("api_keys: each must be non-empty printable ASCII without spaces or commas")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if not self.shutdown_timeout_s >= 0:  # also rejects NaN
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.worker_addresses and self.model_dir is None:
            raise ValueError("model_dir is required with worker_addresses (the tokenizer is read from it)")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.worker_addresses and self.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size applies to local workers; a --worker group is sized by its own "
                             "workers' --tp-size")
        if self.worker_addresses and (
            self.kv_cache_dtype is not KVCacheDType.AUTO or self.quantization is not Quantization.NONE
            or self.quantize_lm_head
        ):
            raise ValueError("kv_cache_dtype, quantization and quantize_lm_head apply to the workers serve starts; "
                             "give them to each external worker (pagedserve worker --kv-cache-dtype / "
                             "--quantization / --quantize-lm-head) instead")
        if self.worker_addresses and not self.dependent_launch:
            raise ValueError("dependent_launch applies to the workers serve starts; give each external worker "
                             "--no-dependent-launch instead")
        if self.worker_addresses and self.batch_invariant:
            raise ValueError("batch_invariant applies to the workers serve starts; give each external worker "
                             "--batch-invariant instead")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class WorkerRestartPolicy(enum.Enum):
    """What `serve` does when a worker's lane dies."""

    ON_FAILURE = "on-failure"  # restart a local worker, reconnect to an external one (with backoff, a limit)
    NEVER = "never"  # leave the lane dead; once no lane is left, serve exits non-zero


@dataclass(frozen=True, slots=True)
class WorkerSupervisorConfig:
    """How dead worker lanes are brought back: at most max_restarts tries per worker within restart_window_s, the
    k-th try of a window (from 0) waiting min(initial_backoff_s * 2**k, max_backoff_s) first."""

    restart_policy: WorkerRestartPolicy = WorkerRestartPolicy.ON_FAILURE
    max_restarts: int = 5
    restart_window_s: float = 600.0
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    worker_start_timeout_s: float = 600.0  # one try: until the worker serves (loads its model) again

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("restart_window_s", "initial_backoff_s", "max_backoff_s", "worker_start_timeout_s"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) must be >= initial_backoff_s "
                             f"({self.initial_backoff_s})")
