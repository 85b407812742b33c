"""The worker's frozen configuration, built once in main.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagedserve.contract.model_format import DeviceKind, DType, KVCacheDType, LoadFormat, Quantization
from pagedserve.gpu_worker.parallel.config import TensorParallelConfig


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker process needs to load its model and serve."""

    model_dir: Path
    dtype: DType = DType.AUTO
    device: DeviceKind = DeviceKind.AUTO
    load_format: LoadFormat = LoadFormat.AUTO
    seed: int = 0
    listen_address: str = "127.0.0.1:50061"
    worker_id: str = "worker-0"
    enforce_eager: bool = False  # never replay CUDA graphs (debugging, or to save their memory)
    dependent_launch: bool = True  # kernels may start before the one ahead ends (compute capability 9.0+)
    tensor_parallel: TensorParallelConfig = TensorParallelConfig()  # this worker's rank in its group; alone by default
    kv_cache_dtype: KVCacheDType = KVCacheDType.AUTO  # FP8: the paged pool holds e4m3, half the bytes per token
    quantization: Quantization = Quantization.NONE  # FP8: linear layers quantized to e4m3 at load
    quantize_lm_head: bool = False  # with FP8 weights, the LM head quantized to e4m3 at load too
    cpu_threads: int = 1  # torch's CPU threads (runtime/cpu_threads.py: main gives the cores it may use)
    # Each row computed as if alone in its step (CPU only): results independent of the schedule (kernels/reference.py)
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        host, sep, port = self.listen_address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen_address must be HOST:PORT, got {self.listen_address!r}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
