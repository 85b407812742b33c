"""Tensor maps (CUtensorMap) of KV caches, for kernels whose tiles the tensor memory accelerator copies (sm_90)."""

from __future__ import annotations

import ctypes
import functools

from pagedserve.kernels.driver import driver_call, driver_function

# Bytes per box row: the widest the 128-byte swizzle allows (64 two-byte or 128 one-byte elements).
BOX_BYTES = 128
_ALIGNMENT = 64  # of an encoded map, as the driver requires
# CUtensorMapDataType by element size: the copy does not convert, so float16 and bfloat16 alike, and e4m3 as bytes
_DATA_TYPES = {1: 0, 2: 1}  # UINT8, UINT16
_INTERLEAVE_NONE = 0
_SWIZZLES = {64: 2, 128: 3}  # CUtensorMapSwizzle by box row bytes: 64B, 128B
_L2_PROMOTION_128B = 2
_OOB_FILL_ZERO = 0


class TensorMap(ctypes.Structure):
    """The 128 opaque bytes of a CUtensorMap, passed by value as a kernel argument."""

    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


@functools.cache
def _encode_tiled() -> ctypes._NamedFuncPointer:
    uint64s, uint32s = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    return driver_function(
        "cuTensorMapEncodeTiled",
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,  # map, data type, rank, global address
        uint64s, uint64s, uint32s, uint32s,  # global dims, global strides, box dims, element strides
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # interleave, swizzle, L2 promotion, out-of-bounds fill
    )


@functools.lru_cache(maxsize=4096)
def rows_tensor_map(address: int, num_rows: int, row_elements: int, box_rows: int,
                    element_bytes: int = 2) -> TensorMap:
    """A 2-D map of num_rows rows of row_elements elements of element_bytes (1 or 2) at device address `address`,
    copied in boxes of box_rows rows x min(row bytes, BOX_BYTES) bytes, swizzled in shared memory by the box row's
    width: 128-byte rows put 16-byte chunk c of box row r at c ^ r % 8, 64-byte rows at c ^ (r / 2) % 4; out-of-bounds
    rows read as zeros.

    A map holds only the address and shape, so one stays valid for any tensor there of that shape (and for CUDA
    graphs, which keep the argument's bytes).
    """
    row_bytes = row_elements * element_bytes
    box_bytes = min(row_bytes, BOX_BYTES)
    if element_bytes not in _DATA_TYPES or box_bytes not in _SWIZZLES or row_bytes % box_bytes or address % 16:
        raise ValueError(f"a tensor map needs 16-byte aligned rows of whole 64- or {BOX_BYTES}-byte boxes of 1- or "
                         f"2-byte elements, got address {address:#x}, {row_elements} elements of {element_bytes} "
                         "bytes per row")
    scratch = ctypes.create_string_buffer(ctypes.sizeof(TensorMap) + _ALIGNMENT)
    aligned = -(-ctypes.addressof(scratch) // _ALIGNMENT) * _ALIGNMENT
    status = _encode_tiled()(
        aligned, _DATA_TYPES[element_bytes], 2, address,
        (ctypes.c_uint64 * 2)(row_elements, num_rows), (ctypes.c_uint64 * 1)(row_bytes),
        (ctypes.c_uint32 * 2)(box_bytes // element_bytes, box_rows), (ctypes.c_uint32 * 2)(1, 1),
        _INTERLEAVE_NONE, _SWIZZLES[box_bytes], _L2_PROMOTION_128B, _OOB_FILL_ZERO,
    )
    driver_call(status, "cuTensorMapEncodeTiled",
                f"{num_rows} x {row_elements} at {address:#x}, boxes of {box_rows} rows")
    tensor_map = TensorMap()
    ctypes.memmove(ctypes.addressof(tensor_map), aligned, ctypes.sizeof(TensorMap))
    return tensor_map
