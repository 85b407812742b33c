"""Launchers of layer_kernels.cu: a decoder layer's fused RMSNorm, residual add, SiLU-and-mul, rotary+KV write, and
an FP8 linear layer's per-token quantization of its input (alone, or fused into the norm or SiLU-and-mul producing
it) and scaling of its unscaled product."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pagedserve.kernels.fp8 import FP8_DTYPE, is_fp8
from pagedserve.kernels.launch_args import (
    SCALAR_TYPE_NAMES,
    address,
    float32,
    int32,
    int64,
    log2_exact,
    pointer,
    scalar_type_name,
)

if TYPE_CHECKING:
    from pagedserve.kernels.module_cache import ModuleCache

SOURCE = "layer_kernels.cu"
KERNEL_NAMES = ("rms_norm", "add_rms_norm", "silu_and_mul", "silu_and_mul_fp8_staged", "rotary_write_kv",
                "scale_fp8_product")
# Kernels that hold a row in registers, VPT vectors a thread (a template argument): per-row quantization, alone or
# fused into the op producing its rows.
ROW_IN_REGISTERS_KERNEL_NAMES = ("quantize_fp8_per_row", "rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8")
VECTORS_PER_THREAD = (1, 2, 4, 8, 16, 32)
VECTOR_BYTES = 16  # the widest load or store of one thread
WARP_THREADS = 32
MAX_ROW_THREADS = 1024  # one CTA per row (norms, quantization): wide rows get every thread of a CTA (.cu's too)
SILU_THREADS = 256
SILU_FP8_STAGED_THREADS = 256  # a CTA looping over its row staged in shared memory; several share an SM
SCALE_THREADS = 256
MAX_ROTARY_THREADS = 512
FP8_CACHE_TYPE = "fp8_e4m3_t"  # kernel_common.cuh


def known_name_expressions() -> list[str]:
    """Every kernel instantiation the launchers can ask for: each kernel, dtype and vector width (and vectors per
    thread of the kernels holding a row in registers), and rotary_write_kv into FP8 caches."""
    names = [
        f"{kernel}<{scalar}, {vec}>"
        for kernel in KERNEL_NAMES
        for dtype, scalar in SCALAR_TYPE_NAMES.items()
        for vec in _vector_widths(dtype)
    ]
    names += [
        f"{kernel}<{scalar}, {vec}, {vpt}>"
        for kernel in ROW_IN_REGISTERS_KERNEL_NAMES
        for dtype, scalar in SCALAR_TYPE_NAMES.items()
        for vec in _vector_widths(dtype)
        for vpt in VECTORS_PER_THREAD
    ]
    return names + [f"rotary_write_kv<{scalar}, {vec}, {FP8_CACHE_TYPE}>" for dtype, scalar in SCALAR_TYPE_NAMES.items()
                    for vec in _vector_widths(dtype)]


def _vector_widths(dtype: torch.dtype) -> list[int]:
    max_width = VECTOR_BYTES // int(dtype.itemsize)
    return [1 << i for i in range(max_width.bit_length())]


def _vector_width(itemsize: int, *byte_counts: int) -> int:
    """Elements per vector: the widest power-of-two load, up to VECTOR_BYTES, dividing every given size, address
    and stride in bytes (the lowest bit set in any of them)."""
    combined = VECTOR_BYTES
    for count in byte_counts:
        combined |= count
    return (combined & -combined) // itemsize


def _threads(num_items: int, max_threads: int) -> int:
    """Threads per CTA for num_items vectors: whole warps, at most max_threads (the kernels loop past it)."""
    return min(max_threads, max(1, -(-num_items // WARP_THREADS)) * WARP_THREADS)


def _row_in_registers(num_vecs: int) -> tuple[int, int]:
    """(threads, vectors per thread) of a CTA holding a row of num_vecs vectors in registers: the plain norm's
    threads, so that each thread sums the same vectors in the same order as there, and the fewest vectors a thread
    (a power of two) that cover the row with them."""
    threads = _threads(num_vecs, MAX_ROW_THREADS)
    vpt = next((v for v in VECTORS_PER_THREAD if v * threads >= num_vecs), None)
    if vpt is None:
        raise ValueError(f"a row of {num_vecs} vectors exceeds the {MAX_ROW_THREADS * VECTORS_PER_THREAD[-1]} "
                         "that per-row quantization holds in registers")
    return threads, vpt


class LayerKernels:
    """Fused element-wise kernels of one decoder layer, each one launch on torch's current stream.

    Each method equals TorchReferenceOps' method of the same name (pagedserve.kernels.reference), rounding as torch
    does (see layer_kernels.cu); none syncs with the host or allocates beyond its returned output, so all are
    capturable in a CUDA graph once an eager call has compiled them. rotary_write_kv writes one layer's paged
    caches key_cache / value_cache, each [num_blocks, num_kv_heads, block_size, head_dim], contiguous.
    """

    def __init__(self, modules: ModuleCache, num_sms: int) -> None:
        self._modules = modules
        self._num_sms = num_sms

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [num_rows, hidden] with unit column stride (rows may be strided); weight: [hidden].

        Returns a new contiguous [num_rows, hidden]: weight * T(x32 * rsqrt(mean(x32^2) + eps)).
        """
        _check_rows("x", x, x.dtype, x.shape[-1])
        _check_weight(weight, x)
        out = weight.new_empty(x.shape)  # new_empty: half the host time of torch.empty
        self._launch_norm("rms_norm", (x,), weight, eps, out)
        return out

    def rms_norm_fp8(self, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """quantize_fp8_per_row(rms_norm(x, weight, eps)) bit for bit, in one launch: (new contiguous e4m3
        [num_rows, hidden], new float32 scales [num_rows, 1])."""
        _check_rows("x", x, x.dtype, x.shape[-1])
        _check_weight(weight, x)
        out, scales = _fp8_rows(weight, *x.shape)
        self._launch_norm("rms_norm_fp8", (x,), weight, eps, out, scales)
        return out, scales

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
        """residual <- residual + x in place (rounded to the dtype); returns rms_norm(residual, weight, eps).

        x, residual: [num_rows, hidden], unit column stride (rows may be strided), not overlapping.
        """
        _check_add_rms_norm(x, residual, weight)
        out = weight.new_empty(x.shape)
        self._launch_norm("add_rms_norm", (x, residual), weight, eps, out)
        return out

    def add_rms_norm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """residual <- residual + x in place, as add_rms_norm; returns quantize_fp8_per_row(rms_norm(residual,
        weight, eps)) bit for bit, in one launch."""
        _check_add_rms_norm(x, residual, weight)
        out, scales = _fp8_rows(weight, *x.shape)
        self._launch_norm("add_rms_norm_fp8", (x, residual), weight, eps, out, scales)
        return out, scales

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        """gate_up: [num_tokens, 2 * size] contiguous (gate, then up) -> new [num_tokens, size]: silu(gate) * up."""
        num_tokens, size = _check_gate_up(gate_up)
        out = gate_up.new_empty((num_tokens, size))
        if num_tokens == 0 or size == 0:
            return out
        vec = _vector_width(gate_up.itemsize, size * gate_up.itemsize, gate_up.data_ptr(), out.data_ptr())
        num_vecs = size // vec
        threads = _threads(num_vecs, SILU_THREADS)
        kernel = self._modules.kernel(SOURCE, f"silu_and_mul<{scalar_type_name(gate_up.dtype)}, {vec}>")
        self._modules.launch(kernel, (num_tokens, -(-num_vecs // threads), 1), (threads, 1, 1),
                             (pointer(gate_up), pointer(out), int32(size)))
        return out

    def silu_and_mul_fp8(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """quantize_fp8_per_row(silu_and_mul(gate_up)) bit for bit, in one launch (one CTA per token): (new
        contiguous e4m3 [num_tokens, size], new float32 scales [num_tokens, 1]).

        A row is held in registers by one CTA, but for rows wider than MAX_ROW_THREADS vectors (an 8B MLP's 1,792)
        when there are more of them than SMs: such a CTA needs more than one vector a thread, which leaves room for
        one CTA an SM, so those rows are staged in shared memory by CTAs of SILU_FP8_STAGED_THREADS instead, several
        an SM. On an H100 that took the 8B shape's 1,056 and 2,048 rows from 43.7 and 82.2 us to 34.4 and 61.5, and
        was 1-12 % slower than registers at fewer rows or the 1B shape's narrower rows
        (benchmarks/results/2026-12-07-staged-silu-fp8-nvidia-h100.md)."""
        num_tokens, size = _check_gate_up(gate_up)
        out, scales = _fp8_rows(gate_up, num_tokens, size)
        if num_tokens == 0 or size == 0:
            return out, scales
        vec = _vector_width(gate_up.itemsize, size * gate_up.itemsize, gate_up.data_ptr(), out.data_ptr())
        num_vecs, dtype = size // vec, scalar_type_name(gate_up.dtype)
        args = (pointer(gate_up), pointer(out), pointer(scales), int32(size))
        if num_vecs > MAX_ROW_THREADS and num_tokens > self._num_sms:
            stage_bytes = size * gate_up.itemsize
            kernel = self._modules.kernel(SOURCE, f"silu_and_mul_fp8_staged<{dtype}, {vec}>",
                                          dynamic_shared_bytes=stage_bytes)
            self._modules.launch(kernel, (num_tokens, 1, 1), (_threads(num_vecs, SILU_FP8_STAGED_THREADS), 1, 1),
                                 args, shared_bytes=stage_bytes)
            return out, scales
        threads, vpt = _row_in_registers(num_vecs)
        kernel = self._modules.kernel(SOURCE, f"silu_and_mul_fp8<{dtype}, {vec}, {vpt}>")
        self._modules.launch(kernel, (num_tokens, 1, 1), (threads, 1, 1), args)
        return out, scales

    def rotary_write_kv(self, qkv: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor, value_cache: Tensor,
                        slot_mapping: Tensor, num_heads: int, num_kv_heads: int, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> Tensor:
        """Rotate q and k (half-split rotary), write k and v to slot slot_mapping[t] of the caches (-1 skips); an
        FP8 cache gets T(k) / k_scale and v / v_scale rounded to e4m3 (caches in qkv's dtype ignore the scales).

        qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim] contiguous, rows of q heads, k heads, v heads;
        cos / sin: [T, head_dim // 2] contiguous, model dtype; slot_mapping: [T] int64. Returns the rotated q
        as a new contiguous [T, num_heads, head_dim].
        """
        head_dim = _check_rotary(qkv, cos, sin, key_cache, value_cache, slot_mapping, num_heads, num_kv_heads)
        num_tokens, half = qkv.shape[0], head_dim // 2
        q = qkv.new_empty((num_tokens, num_heads, head_dim))
        if num_tokens == 0:
            return q
        vec = _vector_width(qkv.itemsize, half * qkv.itemsize,
                            *(t.data_ptr() for t in (qkv, cos, sin, key_cache, value_cache, q)))
        threads = _threads((num_heads + num_kv_heads) * half // vec, MAX_ROTARY_THREADS)
        cache_type = f", {FP8_CACHE_TYPE}" if is_fp8(key_cache.dtype) else ""
        kernel = self._modules.kernel(SOURCE, f"rotary_write_kv<{scalar_type_name(qkv.dtype)}, {vec}{cache_type}>")
        self._modules.launch(kernel, (num_tokens, 1, 1), (threads, 1, 1), (
            pointer(qkv), pointer(cos), pointer(sin), pointer(q), pointer(key_cache), pointer(value_cache),
            pointer(slot_mapping), int32(num_heads), int32(num_kv_heads), int32(head_dim),
            int32(log2_exact(key_cache.shape[2], "block_size")), float32(k_scale), float32(v_scale),
        ))
        return q

    def quantize_fp8_per_row(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [num_rows, num_cols] with unit column stride (rows may be strided) -> (new contiguous e4m3
        [num_rows, num_cols], new float32 scales [num_rows, 1]), bit for bit pagedserve.kernels.fp8.quantize_per_row(x):
        one launch where torch takes eight. The e4m3 conversion needs compute capability 8.9 or later (start-up
        refuses FP8 below it, gpu_worker/fp8_support.py).
        """
        _check_rows("x", x, x.dtype, x.shape[-1])
        num_rows, num_cols = x.shape
        if num_cols == 0:
            raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
        out, scales = _fp8_rows(x, num_rows, num_cols)
        if num_rows == 0:
            return out, scales
        itemsize = x.itemsize
        vec = _vector_width(itemsize, num_cols * itemsize, x.data_ptr(), x.stride(0) * itemsize)
        threads, vpt = _row_in_registers(num_cols // vec)
        kernel = self._modules.kernel(SOURCE, f"quantize_fp8_per_row<{scalar_type_name(x.dtype)}, {vec}, {vpt}>")
        self._modules.launch(kernel, (num_rows, 1, 1), (threads, 1, 1), (
            pointer(x), int64(x.stride(0)), pointer(out), pointer(scales), int32(num_cols),
        ))
        return out, scales

    def scale_fp8_product(self, raw: Tensor, row_scales: Tensor, col_scales: Tensor, bias: Tensor | None,
                          dtype: torch.dtype) -> Tensor:
        """raw: [num_rows, num_cols] contiguous bfloat16, an e4m3 product taken with unit scales (so already rounded
        to bfloat16 once); row_scales: contiguous float32 [num_rows, 1] (quantize_fp8_per_row's); col_scales: float32
        [num_cols]; bias: [num_cols] in dtype or None -> [num_rows, num_cols] in dtype: raw * row_scales[m] *
        col_scales[n] (+ bias[n]), in float32, then rounded to dtype. A bfloat16 result is written over raw."""
        _check_rows("raw", raw, torch.bfloat16, raw.shape[-1])
        num_rows, num_cols = raw.shape
        if not raw.is_contiguous() or row_scales.shape != (num_rows, 1) or col_scales.shape != (num_cols,) or (
            row_scales.dtype != torch.float32 or col_scales.dtype != torch.float32 or not row_scales.is_contiguous()
            or not col_scales.is_contiguous() or row_scales.device != raw.device or col_scales.device != raw.device
        ):
            raise ValueError(f"need a contiguous raw [rows, cols] and contiguous float32 row_scales [rows, 1] and "
                             f"col_scales [cols] on its device, got {tuple(raw.shape)} strides {raw.stride()}, "
                             f"{tuple(row_scales.shape)} {row_scales.dtype} strides {row_scales.stride()} on "
                             f"{row_scales.device}, {tuple(col_scales.shape)} {col_scales.dtype} on "
                             f"{col_scales.device}")
        if bias is not None and (bias.shape != (num_cols,) or bias.dtype != dtype or not bias.is_contiguous()
                                 or bias.device != raw.device):
            raise ValueError(f"bias must be a contiguous [{num_cols}] {dtype} tensor, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
        out = raw if dtype == torch.bfloat16 else raw.new_empty((num_rows, num_cols), dtype=dtype)
        if num_rows == 0 or num_cols == 0:
            return out
        itemsize = out.itemsize
        byte_counts = [num_cols * itemsize, out.data_ptr()] + ([] if bias is None else [bias.data_ptr()])
        vec = min(_vector_width(2, num_cols * 2, raw.data_ptr()), _vector_width(itemsize, *byte_counts))
        num_vecs = num_cols // vec
        threads = _threads(num_vecs, SCALE_THREADS)
        kernel = self._modules.kernel(SOURCE, f"scale_fp8_product<{scalar_type_name(dtype)}, {vec}>")
        self._modules.launch(kernel, (num_rows, -(-num_vecs // threads), 1), (threads, 1, 1), (
            pointer(raw), pointer(row_scales), pointer(col_scales), address(0) if bias is None else pointer(bias),
            pointer(out), int32(num_cols),
        ))
        return out

    def _launch_norm(self, name: str, rows: tuple[Tensor, ...], weight: Tensor, eps: float, out: Tensor,
                     scales: Tensor | None = None) -> None:
        """One CTA per row; the kernel takes (pointer, row stride) of each tensor of rows, then weight, out (the
        normed rows [num_rows, hidden]) and, for a kernel quantizing them (which holds its row in registers),
        scales."""
        num_rows, hidden = rows[0].shape
        if num_rows == 0 or hidden == 0:
            return
        itemsize = weight.itemsize
        args: list[ctypes._SimpleCData[Any]] = []
        byte_counts = [hidden * itemsize, weight.data_ptr(), out.data_ptr()]
        for tensor in rows:
            args += (pointer(tensor), int64(tensor.stride(0)))
            byte_counts += (tensor.data_ptr(), tensor.stride(0) * itemsize)
        vec = _vector_width(itemsize, *byte_counts)
        outputs = [pointer(out)]
        if scales is None:
            threads, template_args = _threads(hidden // vec, MAX_ROW_THREADS), f"{vec}"
        else:
            threads, vpt = _row_in_registers(hidden // vec)
            template_args, outputs = f"{vec}, {vpt}", [*outputs, pointer(scales)]
        kernel = self._modules.kernel(SOURCE, f"{name}<{scalar_type_name(weight.dtype)}, {template_args}>")
        self._modules.launch(kernel, (num_rows, 1, 1), (threads, 1, 1), (
            *args, pointer(weight), *outputs, int32(hidden), float32(eps),
        ))


def _check_rows(name: str, tensor: Tensor, dtype: torch.dtype, hidden: int) -> None:
    """[num_rows, hidden] CUDA tensor of dtype whose elements within a row are adjacent."""
    if tensor.dim() != 2 or tensor.dtype != dtype or not tensor.is_cuda or tensor.shape[1] != hidden:
        raise ValueError(f"{name} must be a CUDA [num_rows, {hidden}] {dtype} tensor, got {tuple(tensor.shape)} "
                         f"{tensor.dtype} on {tensor.device}")
    if tensor.stride(1) != 1 and hidden > 1:
        raise ValueError(f"{name} must have unit column stride, got strides {tensor.stride()}")
    scalar_type_name(dtype)


def _fp8_rows(like: Tensor, num_rows: int, num_cols: int) -> tuple[Tensor, Tensor]:
    """New e4m3 [num_rows, num_cols] and float32 [num_rows, 1] tensors on like's device: quantized rows and their
    scales."""
    return (like.new_empty((num_rows, num_cols), dtype=FP8_DTYPE),
            like.new_empty((num_rows, 1), dtype=torch.float32))


def _check_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> None:
    _check_rows("x", x, x.dtype, x.shape[-1])
    _check_rows("residual", residual, x.dtype, x.shape[1])
    if residual.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in rows")
    _check_weight(weight, x)


def _check_gate_up(gate_up: Tensor) -> tuple[int, int]:
    """Validates silu_and_mul's input; returns (num_tokens, size)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous() or not gate_up.is_cuda:
        raise ValueError(f"gate_up must be a contiguous CUDA [num_tokens, 2 * size] tensor, got "
                         f"{tuple(gate_up.shape)} strides {gate_up.stride()} on {gate_up.device}")
    return gate_up.shape[0], gate_up.shape[1] // 2


def _check_weight(weight: Tensor, x: Tensor) -> None:
    if weight.shape != x.shape[1:] or weight.dtype != x.dtype or weight.device != x.device or (
        not weight.is_contiguous()
    ):
        raise ValueError(f"weight must be a contiguous [{x.shape[1]}] {x.dtype} tensor on {x.device}, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")


def _check_rotary(qkv: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor, value_cache: Tensor,
                  slot_mapping: Tensor, num_heads: int, num_kv_heads: int) -> int:
    """Validates rotary_write_kv's arguments; returns head_dim."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or not key_cache.is_contiguous() or (
        not value_cache.is_contiguous()
    ):
        raise ValueError(f"key_cache / value_cache must be contiguous [num_blocks, num_kv_heads, block_size, "
                         f"head_dim] of one shape, got {tuple(key_cache.shape)} / {tuple(value_cache.shape)}")
    head_dim = key_cache.shape[3]
    if num_heads <= 0 or num_kv_heads != key_cache.shape[1] or head_dim % 2:
        raise ValueError(f"need num_heads > 0, num_kv_heads == cache heads {key_cache.shape[1]} and an even "
                         f"head_dim, got {num_heads}, {num_kv_heads}, {head_dim}")
    num_tokens = qkv.shape[0]
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (qkv.dtype, FP8_DTYPE):
        raise ValueError(f"caches of {key_cache.dtype} / {value_cache.dtype} do not fit qkv of {qkv.dtype}: "
                         "they hold qkv's dtype or FP8")
    _check_rows("qkv", qkv, qkv.dtype, (num_heads + 2 * num_kv_heads) * head_dim)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (num_tokens, head_dim // 2) or table.dtype != qkv.dtype or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{num_tokens}, {head_dim // 2}] {qkv.dtype} tensor, "
                             f"got {tuple(table.shape)} {table.dtype}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous [{num_tokens}] int64 tensor, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if not qkv.is_contiguous() or len({t.device for t in (qkv, cos, sin, key_cache, value_cache, slot_mapping)}) > 1:
        raise ValueError("qkv must be contiguous and on the device of cos, sin, the caches and slot_mapping")
    return head_dim
