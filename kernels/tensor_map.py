"""Tensor maps (CUtensorMap) of KV caches, for kernels whose tiles the tensor memory accelerator copies (sm_90)."""

from __future__ import annotations

import ctypes
import functools

# Columns per box: 64 two-byte elements are 128 bytes, the widest box row the 128-byte swizzle allows.
BOX_COLUMNS = 64
_ALIGNMENT = 64  # of an encoded map, as the driver requires
_UINT16 = 1  # CUtensorMapDataType: two-byte elements (the copy does not convert, so float16 and bfloat16 alike)
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_OOB_FILL_ZERO = 0


class TensorMap(ctypes.Structure):
    """The 128 opaque bytes of a CUtensorMap, passed by value as a kernel argument."""

    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


NO_TENSOR_MAP = TensorMap()  # the argument of kernels that copy without the tensor memory accelerator


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.lru_cache(maxsize=4096)
def rows_tensor_map(address: int, num_rows: int, row_elements: int, box_rows: int) -> TensorMap:
    """A 2-D map of num_rows rows of row_elements two-byte elements at device address `address`, copied in boxes of
    box_rows rows x BOX_COLUMNS elements, 128-byte swizzled in shared memory (16-byte chunk c of box row r lands at
    c ^ r % 8); out-of-bounds rows read as zeros.

    A map holds only the address and shape, so one stays valid for any tensor there of that shape (and for CUDA
    graphs, which keep the argument's bytes).
    """
    if address % 16 or row_elements % BOX_COLUMNS:  # rows of whole boxes are whole 16-byte units
        raise ValueError(f"a tensor map needs 16-byte aligned rows of whole {BOX_COLUMNS}-element boxes, got "
                         f"address {address:#x}, {row_elements} elements per row")
    scratch = ctypes.create_string_buffer(ctypes.sizeof(TensorMap) + _ALIGNMENT)
    aligned = -(-ctypes.addressof(scratch) // _ALIGNMENT) * _ALIGNMENT
    status = _driver().cuTensorMapEncodeTiled(
        ctypes.c_void_p(aligned), _UINT16, 2, ctypes.c_void_p(address),
        (ctypes.c_uint64 * 2)(row_elements, num_rows), (ctypes.c_uint64 * 1)(row_elements * 2),
        (ctypes.c_uint32 * 2)(BOX_COLUMNS, box_rows), (ctypes.c_uint32 * 2)(1, 1),
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B, _OOB_FILL_ZERO,
    )
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for {num_rows} x {row_elements} "
                           f"at {address:#x}, boxes of {box_rows} rows")
    tensor_map = TensorMap()
    ctypes.memmove(ctypes.addressof(tensor_map), aligned, ctypes.sizeof(TensorMap))
    return tensor_map
