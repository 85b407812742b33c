"""The marks of tests that need a CUDA GPU and CuPy (and FP8 kernels, compute capability 8.9 or later): CI has
neither and skips them; they run on a GPU host."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA_KERNELS = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU and CuPy")]
HAS_FP8_KERNELS = HAS_CUDA_KERNELS and torch.cuda.get_device_capability() >= (8, 9)
NEEDS_FP8_GPU = [*NEEDS_GPU, pytest.mark.skipif(not HAS_FP8_KERNELS, reason="FP8 needs compute capability 8.9+")]
