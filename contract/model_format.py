"""How a worker loads its model (dtype, device, weight format): modes both planes name, standard library only."""

from __future__ import annotations

import enum


class DType(enum.Enum):
    """Weight and KV-cache dtype; AUTO takes the model's config.json dtype."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class DeviceKind(enum.Enum):
    """Where the model runs; AUTO picks CUDA when a GPU is visible."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class LoadFormat(enum.Enum):
    """How weights are obtained: safetensors files, or seeded random weights of the right shapes."""

    AUTO = "auto"
    SAFETENSORS = "safetensors"
    DUMMY = "dummy"


class KVCacheDType(enum.Enum):
    """Element type of the paged KV pool: AUTO keeps the model dtype; FP8 stores e4m3 with a per-layer scale."""

    AUTO = "auto"
    FP8 = "fp8"


class Quantization(enum.Enum):
    """How linear-layer weights are held: NONE in the model dtype (unless the checkpoint is FP8); FP8 as e4m3
    with per-output-channel scales, multiplied with per-token-scaled e4m3 activations."""

    NONE = "none"
    FP8 = "fp8"
