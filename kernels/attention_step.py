"""One step's attention, validated and built once and queued for every layer: the layers of a step differ only in
their caches and scales, so CudaKernelOps keeps the last step's launches while its arguments stay the same."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class LayerLaunch(Protocol):
    def launch(self, key_cache: Tensor, value_cache: Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None: ...


def step_key(out: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
             seq_lens: Tensor, query_start_loc: Tensor, max_query_len: int, max_seq_len: int,
             scale: float) -> tuple[object, ...]:
    """Equal for two calls of paged_attention only when their validation and their launches' arguments are the same
    but for the caches' addresses and the scales: each tensor's address, shape, strides, dtype and device, the caches'
    without their address, and the host values."""
    return (_tensor(out), _tensor(query), _tensor(block_tables), _tensor(seq_lens), _tensor(query_start_loc),
            _cache(key_cache), _cache(value_cache), max_query_len, max_seq_len, scale)


def _tensor(tensor: Tensor) -> tuple[object, ...]:
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _cache(tensor: Tensor) -> tuple[object, ...]:
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device


class AttentionStep:
    """The launches of one step's attention (step_key), queued per layer."""

    def __init__(self, key: tuple[object, ...], launches: list[LayerLaunch]) -> None:
        self.key = key
        self._launches = launches

    def launch(self, key_cache: Tensor, value_cache: Tensor, k_scale: float, v_scale: float) -> None:
        for launch in self._launches:
            launch.launch(key_cache, value_cache, k_scale, v_scale)
