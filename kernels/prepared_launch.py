"""Kernel launches built once and queued many times: a step's attention is the same launch for every layer but for
the layer's caches and scales, so the layers share one validation and one argument array."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from pagedserve.kernels.tensor_map import TensorMap

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import CompiledKernel, ModuleCache

LOG2_E = math.log2(math.e)


def argument_addresses(args: Sequence[ctypes._SimpleCData[Any] | ctypes.Structure]) -> ctypes.Array[ctypes.c_void_p]:
    """The kernel-parameter array of args: the address of each. The launch call copies every argument from its address
    when it is called, so an argument's value may change between two launches of one array."""
    return (ctypes.c_void_p * len(args))(*(ctypes.addressof(arg) for arg in args))


class PreparedLaunch:
    """One kernel launch built once and queued any number of times: the caller keeps the ctypes values it passed and
    changes those that differ between launches (LayerArgs) before each launch()."""

    def __init__(self, modules: ModuleCache, kernel: CompiledKernel, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: Sequence[ctypes._SimpleCData[Any] | ctypes.Structure],
                 shared_bytes: int = 0) -> None:
        self._modules, self._kernel, self._grid, self._block = modules, kernel, grid, block
        self._args = tuple(args)  # the parameter array points into these
        self._params = argument_addresses(self._args)
        self._shared_bytes = shared_bytes

    def launch(self) -> None:
        self._modules.launch_params(self._kernel, self._grid, self._block, self._params, self._shared_bytes)


class LayerArgs:
    """The arguments of an attention launch that change from layer to layer: the caches' addresses (and tensor maps),
    the query-key scale times log2(e) and the value scale (an FP8 cache's k_scale and v_scale; 1 otherwise)."""

    def __init__(self, scale: float, is_fp8_cache: bool) -> None:
        self._scale, self._is_fp8_cache = scale, is_fp8_cache
        self.key_cache, self.value_cache = ctypes.c_uint64(0), ctypes.c_uint64(0)
        self.key_map, self.value_map = TensorMap(), TensorMap()  # all zeros (no tensor map) until set_maps()
        self.qk_scale, self.v_scale = ctypes.c_float(scale * LOG2_E), ctypes.c_float(1.0)

    def set(self, key_cache: Tensor, value_cache: Tensor, k_scale: float, v_scale: float) -> None:
        self.key_cache.value = key_cache.data_ptr()
        self.value_cache.value = value_cache.data_ptr()
        if not self._is_fp8_cache:
            k_scale = v_scale = 1.0
        self.qk_scale.value = self._scale * k_scale * LOG2_E
        self.v_scale.value = v_scale

    def set_maps(self, key_map: TensorMap, value_map: TensorMap) -> None:
        ctypes.memmove(ctypes.addressof(self.key_map), ctypes.addressof(key_map), ctypes.sizeof(TensorMap))
        ctypes.memmove(ctypes.addressof(self.value_map), ctypes.addressof(value_map), ctypes.sizeof(TensorMap))
