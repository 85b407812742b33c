"""Rotary position embedding (half-split layout, as Hugging Face Llama), with optional Llama 3 scaling."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from pagedserve.gpu_worker.models.model_config import Llama3RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] float32 rotation frequencies, rescaled for long context when scaling is given."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    # Llama 3 keeps high frequencies (short wavelengths), divides low ones by `factor`, and blends
    # linearly in between, so local order is kept while long-range positions are stretched.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotation angles of absolute positions, computed once per forward pass and shared by every layer (no cache
    of angles, so no length limit)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, scaling: Llama3RopeScaling | None, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """positions: [T] int64 -> cos and sin, each [T, head_dim // 2] in dtype (Hugging Face rounds them so too)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return Rotation(angles.cos().to(dtype), angles.sin().to(dtype))

    if TYPE_CHECKING:  # nn.Module.__call__ runs forward (and any hooks) but is typed as returning Any
        __call__ = forward


class Rotation(NamedTuple):
    """One forward pass's rotation, applied by KernelOps.rotary_write_kv: cos and sin, each [T, head_dim // 2]."""

    cos: torch.Tensor
    sin: torch.Tensor
