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
