"""The kernel-ops interface the model and worker call, and the factory choosing an implementation per device."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class KernelOps(Protocol):
    """Paged-KV attention, cache maintenance, a decoder layer's fused element-wise ops and the token masks of
    structured output.

    KV pool layout (one tensor per model, owned by the worker):
        kv_cache:    [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim], contiguous;
        key_cache:   kv_cache[layer, 0], value_cache: kv_cache[layer, 1],
                     each [num_blocks, num_kv_heads, block_size, head_dim].
    Token at absolute position p of a sequence lives in block block_table[p // block_size] at offset
    p % block_size; its slot is block_id * block_size + offset.
    The pool is in the model dtype, or FP8 (torch.float8_e4m3fn, see pagedserve.kernels.fp8) holding each layer's
    keys / k_scale and values / v_scale: writes quantize (saturating), attention dequantizes as it reads. The
    scales are ignored for other pools.
    """

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [..., in] times weight [out, in] transposed (+ bias [out]) -> [..., out], as F.linear. Batch-invariant
        ops (get_kernel_ops) compute each row by itself, so a row's product never depends on the rows beside it."""
        ...

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:
        """Store key/value [num_tokens, num_kv_heads, head_dim] into their slots.

        slot_mapping: [num_tokens] int64; a slot of -1 skips the token (padding).
        """
        ...

    def paged_attention(
        self,
        out: Tensor,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        block_tables: Tensor,
        seq_lens: Tensor,
        query_start_loc: Tensor,
        max_query_len: int,
        max_seq_len: int,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Causal attention of each sequence's query rows over its paged context; writes out in place.

        query/out: [num_tokens, num_q_heads, head_dim], num_q_heads a multiple of num_kv_heads (GQA).
        block_tables: [num_seqs, max_num_blocks_per_seq] int32; seq_lens: [num_seqs] int32 (context length
        after this step); query_start_loc: [num_seqs + 1] int32 (cumulative query rows). Query row i of a
        sequence with q_len rows sits at position seq_len - q_len + i and attends to positions 0..itself.
        max_query_len / max_seq_len are host-side upper bounds. Softmax runs in float32.
        """
        ...

    def copy_blocks(self, kv_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy every layer's K and V of block src into block dst for each (src, dst) row.

        kv_cache: the whole pool [L, 2, N, H, B, D]; block_mapping: [M, 2] int64 on the pool's device.
        """
        ...

    def spread_block_tables(self, packed: Tensor, block_tables: Tensor) -> None:
        """A decode step's tables into a static table, with its size read on the device (so a CUDA graph replays it
        for every step): block_tables[r, :width] = packed[2 + r * width : 2 + (r + 1) * width] for r < num_seqs,
        where packed[0] = num_seqs and packed[1] = width; rows from num_seqs on and columns from width on keep their
        values. packed: int32 [>= 2 + num_seqs * width]; block_tables: [rows, max_blocks] int32, contiguous, on
        packed's device; num_seqs <= rows and width <= max_blocks (not checked on the device)."""
        ...

    def swap_blocks(self, src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy whole blocks between two pools ([L, 2, N_src, H, B, D] -> [L, 2, N_dst, H, B, D]).

        block_mapping: [M, 2] int64 on the CPU, rows of (src block, dst block).
        """
        ...


    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [num_rows, hidden] (unit column stride) -> new [num_rows, hidden]: x normalised in float32, rounded
        to x's dtype, then times weight [hidden] in that dtype (Hugging Face's Llama RMSNorm)."""
        ...

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
        """residual <- residual + x in place (rounded to the dtype); returns rms_norm(residual, weight, eps)."""
        ...

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        """gate_up: [num_tokens, 2 * size] contiguous, gate then up -> new [num_tokens, size]: silu(gate) * up,
        each rounded to the dtype as torch rounds it."""
        ...

    def rotary_write_kv(self, qkv: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor, value_cache: Tensor,
                        slot_mapping: Tensor, num_heads: int, num_kv_heads: int, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> Tensor:
        """Half-split rotary (Hugging Face Llama layout) on the q and k heads of qkv; writes the rotated k and the
        v heads into their slots (slot -1 skips); returns the rotated q as a new contiguous [T, num_heads, D].

        qkv: [T, (num_heads + 2 * num_kv_heads) * D] contiguous, q heads then k heads then v heads; cos / sin:
        [T, D // 2] in qkv's dtype; key_cache / value_cache: one layer's [num_blocks, num_kv_heads, block_size, D].
        """
        ...

    def quantize_fp8_per_row(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [num_rows, num_cols] in the model dtype, unit column stride (rows may be strided) -> (new contiguous
        e4m3 [num_rows, num_cols], new float32 scales [num_rows, 1]): pagedserve.kernels.fp8.quantize_per_row, an FP8
        linear layer's per-token activation quantization."""
        ...

    def rms_norm_fp8(self, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """x: [num_rows, hidden] in the model dtype (unit column stride), weight: [hidden] -> (new contiguous e4m3
        [num_rows, hidden], new float32 scales [num_rows, 1]): quantize_fp8_per_row(rms_norm(x, weight, eps)), the
        norm's output as the FP8 linear layer reading it takes it."""
        ...

    def add_rms_norm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """residual <- residual + x in place (x, residual: [num_rows, hidden]); returns (e4m3 [num_rows, hidden],
        float32 [num_rows, 1]): quantize_fp8_per_row(rms_norm(residual, weight, eps))."""
        ...

    def silu_and_mul_fp8(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """gate_up: [num_tokens, 2 * size] contiguous, gate then up -> (new contiguous e4m3 [num_tokens, size], new
        float32 scales [num_tokens, 1]): quantize_fp8_per_row(silu_and_mul(gate_up))."""
        ...

    def scale_fp8_product(self, raw: Tensor, row_scales: Tensor, col_scales: Tensor, bias: Tensor | None,
                          dtype: torch.dtype) -> Tensor:
        """An FP8 linear layer's product taken with unit scales, scaled: raw [num_rows, num_cols] bfloat16
        (contiguous), row_scales float32 [num_rows, 1], col_scales float32 [num_cols], bias [num_cols] in dtype or
        None -> [num_rows, num_cols] in dtype: raw * row_scales[m] * col_scales[n] (+ bias[n]), computed in float32
        in that order, then rounded to dtype (raw itself was rounded to bfloat16 by the product); a bfloat16 result
        may be written over raw."""
        ...

    def fp8_gemv(self, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
        """An FP8 linear layer's product for a few rows, weight-only dequantized (x is not quantized): x [num_rows,
        in] float16 / bfloat16 (unit column stride) times e4m3 weight [out, in] with float32 weight_scale [out]
        (+ bias [out] in x's dtype) -> new [num_rows, out] in x's dtype, accumulated in float32. On CUDA for 1 to
        GEMV_MAX_ROWS rows (pagedserve.kernels.fp8_gemv.supports says which inputs)."""
        ...

    def apply_token_masks(self, logits: Tensor, masks: Tensor) -> None:
        """Structured output's masks on a batch's logits, in place: logits[r, t] = -inf wherever bit t % 32 of
        masks[r, t // 32] is clear. logits: [rows, vocab] float32 (unit column stride); masks: [rows,
        ceil(vocab / 32)] int32, contiguous, on logits' device."""
        ...

    def masked_argmax(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        """A greedy batch's tokens, under its masks when given: new [rows] int64, torch.argmax of each row after
        apply_token_masks (the first index of the largest value, NaN the largest), the logits left unchanged.
        logits: [rows, vocab] float32, float16 or bfloat16 (unit column stride), read in their own dtype."""
        ...


def get_kernel_ops(device: torch.device, dependent_launch: bool = True, batch_invariant: bool = False) -> KernelOps:
    """Return the implementation for device: the torch reference on CPU, CuPy kernels on CUDA (launched as
    programmatic dependent launches where the device has them, unless dependent_launch is False).

    batch_invariant: every row's linear products and attention are computed as if it were alone in its step, so a
    sequence's results do not depend on which sequences share its steps (the schedule); only the torch reference
    has that mode: ValueError on CUDA."""
    if device.type == "cuda":
        if batch_invariant:
            raise ValueError(
                "batch-invariant computation is available on the CPU worker only (its torch reference ops); CUDA "
                "kernels and cuBLAS pick their tiling by the number of rows")
        # Imported lazily so CPU-only installs never import cupy.
        from pagedserve.kernels.cuda_ops import CudaKernelOps

        return CudaKernelOps(device, dependent_launch)
    from pagedserve.kernels.reference import TorchReferenceOps

    return TorchReferenceOps(batch_invariant)
