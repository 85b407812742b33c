"""Which devices run FP8: the one start-up check behind --kv-cache-dtype fp8 and FP8 weights."""

from __future__ import annotations

import torch

from pagedserve.gpu_worker.errors import ModelLoadError

# e4m3 conversions (cvt ... e4m3x2) and FP8 tensor-core matmuls exist from Ada (sm_89) on; Hopper is sm_90.
FP8_MIN_CAPABILITY = (8, 9)


def require_fp8_device(device: torch.device, what: str) -> None:
    """Returns when device can run `what` in FP8: any CPU (the torch reference dequantizes, then computes) and
    CUDA devices of compute capability 8.9 or later; ModelLoadError naming the device otherwise."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ModelLoadError(
            f"{what} needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later "
            f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}. Serve it in "
            "the model dtype instead (--kv-cache-dtype auto, no --quantization, a checkpoint that is not FP8)"
        )
