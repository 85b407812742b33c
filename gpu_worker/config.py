"""The worker's frozen configuration, built once in main.py."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import torch


class DType(enum.Enum):
    """Weight and KV-cache dtype; AUTO takes the model's config.json dtype."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self is DType.AUTO:
            raise ValueError("DType.AUTO has no torch dtype until resolved against a model config")
        return _TORCH_DTYPES[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        for member, value in _TORCH_DTYPES.items():
            if value == dtype:
                return member
        raise ValueError(f"unsupported dtype {dtype}")


_TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


class DeviceKind(enum.Enum):
    """Where the model runs; AUTO picks CUDA when a GPU is visible."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def resolve(self) -> torch.device:
        """The concrete torch device (CUDA device 0 for AUTO/CUDA on a GPU host)."""
        if self is DeviceKind.CPU or (self is DeviceKind.AUTO and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA device is visible")
        return torch.device("cuda", torch.cuda.current_device())


class LoadFormat(enum.Enum):
    """How weights are obtained: safetensors files, or seeded random weights of the right shapes."""

    AUTO = "auto"
    SAFETENSORS = "safetensors"
    DUMMY = "dummy"


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

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        host, sep, port = self.listen_address.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen_address must be HOST:PORT, got {self.listen_address!r}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
