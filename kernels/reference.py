"""Pure-torch reference of every kernel op: what the CPU worker runs and what kernel tests compare to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pagedserve.kernels.fp8 import as_bytes, dequantize, is_fp8, quantize, quantize_per_row


class TorchReferenceOps:
    """Readable torch implementation of KernelOps, on any device.

    Works on the pool layout of pagedserve.kernels.ops: key_cache / value_cache are
    [num_blocks, num_kv_heads, block_size, head_dim]; the whole pool is [L, 2, N, H, B, D].
    Attention is vectorised per sequence (one gather and two batched matmuls per sequence), so it is
    usable as the CPU worker's attention. It reads lengths back to the host, so it is not graph-capturable.
    An FP8 (e4m3) pool holds key / k_scale and value / v_scale: writes quantize, attention dequantizes in float32.

    batch_invariant: linear products and attention are computed row by row, each query row as a decode of its own
    position would compute it, so every row's bits are those it would have alone in a step. A matmul's rounding
    otherwise depends on how many rows it takes (the CPU's kernels round a few rows differently from many, and on
    several threads by how the rows are split; a prompt's attention rows differ from their decodes'), so preemption,
    which changes how many sequences share a step, could move a value across an e4m3 rounding boundary of an FP8
    cache. Norms, softmax and the element-wise ops are row-independent already.
    """

    def __init__(self, batch_invariant: bool = False) -> None:
        self.batch_invariant = batch_invariant

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """F.linear; batch-invariant: one [1, in] x [in, out] product per row (a batched matmul of the weight
        broadcast, not copied, over the rows), whatever the number of rows."""
        if not self.batch_invariant:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.bmm(rows.unsqueeze(1), weight.t().unsqueeze(0).expand(rows.shape[0], -1, -1)).squeeze(1)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def write_kv(
        self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ) -> None:
        """Store key/value [num_tokens, num_kv_heads, head_dim] into slots; slot -1 skips the token. An FP8 cache
        stores quantize(key, k_scale) and quantize(value, v_scale); other caches ignore the scales."""
        block_size = key_cache.shape[2]
        is_kept = slot_mapping >= 0
        slots = slot_mapping[is_kept]
        block_ids = slots // block_size
        offsets = slots % block_size
        for rows, cache, scale in ((key[is_kept], key_cache, k_scale), (value[is_kept], value_cache, v_scale)):
            stored = quantize(rows, scale) if is_fp8(cache.dtype) else rows.to(cache.dtype)
            # Advanced indices on dims 0 and 2 put the token axis first: [n, num_kv_heads, head_dim].
            as_bytes(cache)[block_ids, :, offsets] = as_bytes(stored)

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
        """Causal attention per sequence over its paged context, softmax in float32; writes out in place. An FP8
        cache's keys and values are dequantized with k_scale / v_scale (float32) first. Batch-invariant: each query
        row attends alone, over the keys up to its position."""
        del max_query_len, max_seq_len  # Exact lengths are read from the tensors below.
        starts = query_start_loc.tolist()
        lens = seq_lens.tolist()
        kv_scales = (k_scale, v_scale) if is_fp8(key_cache.dtype) else (1.0, 1.0)
        for seq_index, seq_len in enumerate(lens):
            start, end = starts[seq_index], starts[seq_index + 1]
            if end == start:
                continue
            table = block_tables[seq_index]
            if not self.batch_invariant:
                out[start:end] = _attend_one_sequence(query[start:end], key_cache, value_cache, table, seq_len,
                                                      scale, kv_scales).to(out.dtype)
                continue
            first_position = seq_len - (end - start)
            for row in range(start, end):
                out[row : row + 1] = _attend_one_sequence(query[row : row + 1], key_cache, value_cache, table,
                                                          first_position + row - start + 1, scale,
                                                          kv_scales).to(out.dtype)

    def copy_blocks(self, kv_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy every layer's K and V of block src into block dst, for each (src, dst) row."""
        src, dst = block_mapping[:, 0], block_mapping[:, 1]
        # The right-hand side is gathered before any write, so a dst that is also a src reads old data.
        as_bytes(kv_cache)[:, :, dst] = as_bytes(kv_cache)[:, :, src]

    def swap_blocks(self, src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
        """Copy whole blocks between two pools of the same layout, possibly on different devices."""
        src = block_mapping[:, 0].to(src_cache.device)
        dst = block_mapping[:, 1].to(dst_cache.device)
        gathered = as_bytes(src_cache).index_select(2, src).to(dst_cache.device)
        as_bytes(dst_cache).index_copy_(2, dst, gathered)

    def spread_block_tables(self, packed: Tensor, block_tables: Tensor) -> None:
        """block_tables[:num_seqs, :width] = the dense [num_seqs, width] tables after packed's header."""
        num_seqs, width = (int(value) for value in packed[:2].tolist())
        num_seqs = min(num_seqs, block_tables.shape[0])
        block_tables[:num_seqs, :width] = packed[2 : 2 + num_seqs * width].view(num_seqs, width)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [num_rows, hidden]; weight: [hidden]. Normalised in float32, rounded to x's dtype, then scaled."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
        """residual <- residual + x in place (x, residual: [num_rows, hidden]); returns rms_norm(residual)."""
        residual.add_(x)
        return self.rms_norm(residual, weight, eps)

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        """gate_up: [num_tokens, 2 * size], gate then up -> [num_tokens, size]: silu(gate) * up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_write_kv(self, qkv: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor, value_cache: Tensor,
                        slot_mapping: Tensor, num_heads: int, num_kv_heads: int, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> Tensor:
        """Half-split rotary on q and k, then k and v into their cache slots (-1 skips); returns the rotated q.

        qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim], rows of q heads, k heads, v heads; cos / sin:
        [T, head_dim // 2] in qkv's dtype; caches: [num_blocks, num_kv_heads, block_size, head_dim];
        slot_mapping: [T] int64. Returns a new contiguous [T, num_heads, head_dim].
        """
        num_rotated = num_heads + num_kv_heads  # q and k heads are adjacent: one rotation covers both
        heads = qkv.reshape(qkv.shape[0], num_rotated + num_kv_heads, -1)
        qk, v = heads[:, :num_rotated], heads[:, num_rotated:]
        cos, sin = cos[:, None, :], sin[:, None, :]
        first, second = qk.chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        self.write_kv(rotated[:, num_heads:], v, key_cache, value_cache, slot_mapping, k_scale, v_scale)
        return rotated[:, :num_heads].contiguous()

    def quantize_fp8_per_row(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [num_rows, num_cols] -> (e4m3 [num_rows, num_cols], float32 scales [num_rows, 1]), per row."""
        return quantize_per_row(x)

    def rms_norm_fp8(self, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """The norm of x [num_rows, hidden], quantized per row: (e4m3 [num_rows, hidden], float32 [num_rows, 1])."""
        return quantize_per_row(self.rms_norm(x, weight, eps))

    def add_rms_norm_fp8(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """residual <- residual + x in place; the norm of the sum, quantized per row."""
        return quantize_per_row(self.add_rms_norm(x, residual, weight, eps))

    def silu_and_mul_fp8(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """silu(gate) * up of gate_up [num_tokens, 2 * size], quantized per row."""
        return quantize_per_row(self.silu_and_mul(gate_up))

    def scale_fp8_product(self, raw: Tensor, row_scales: Tensor, col_scales: Tensor, bias: Tensor | None,
                          dtype: torch.dtype) -> Tensor:
        """raw * row_scales * col_scales (+ bias) in float32, in that order, rounded to dtype once: a new tensor."""
        out = raw.float() * row_scales * col_scales
        if bias is not None:
            out = out + bias.float()
        return out.to(dtype)

    def fp8_gemv(self, x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [num_rows, in] times e4m3 weight [out, in] dequantized to float32 times weight_scale [out] (+ bias), in
        float32, rounded to x's dtype: [num_rows, out]."""
        out = x.float() @ dequantize(weight, weight_scale[:, None]).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    def apply_token_masks(self, logits: Tensor, masks: Tensor) -> None:
        """logits[r, t] = -inf wherever bit t % 32 of masks[r, t // 32] is clear, in place. logits: [rows, vocab]
        float32; masks: [rows, ceil(vocab / 32)] int32 on logits' device."""
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        bits = (masks.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]: bit 0 of word w is token 32 w
        logits.masked_fill_(bits.reshape(masks.shape[0], -1)[:, : logits.shape[1]].eq(0), float("-inf"))

    def masked_argmax(self, logits: Tensor, masks: Tensor | None) -> Tensor:
        """[rows] int64: torch.argmax of each row, of a float32 copy of logits after apply_token_masks when masks are
        given."""
        if masks is None:
            return logits.argmax(dim=-1)
        masked = logits.float()
        if masked is logits:
            masked = logits.clone()
        self.apply_token_masks(masked, masks)
        return masked.argmax(dim=-1)


def _attend_one_sequence(
    query: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor, seq_len: int, scale: float,
    kv_scales: tuple[float, float],
) -> Tensor:
    """Attention of one sequence's query rows [q_len, num_q_heads, D]; returns float32, same shape. Keys and
    values are read as float32 times kv_scales (1.0 unless the cache is FP8).

    Query heads are grouped by kv head (head h uses kv head h // group_size), so K/V are never repeated:
        q: [kv_heads, group_size * q_len, D]  x  k^T: [kv_heads, D, seq_len]
    """
    q_len, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group_size = num_q_heads // num_kv_heads
    num_blocks = -(-seq_len // block_size)
    block_ids = block_table[:num_blocks].to(torch.long)
    keys = _gather_context(key_cache, block_ids, seq_len, kv_scales[0])
    values = _gather_context(value_cache, block_ids, seq_len, kv_scales[1])

    grouped = query.float().reshape(q_len, num_kv_heads, group_size, head_dim)
    grouped = grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, group_size * q_len, head_dim)
    scores = torch.bmm(grouped, keys.transpose(1, 2)) * scale
    # Row i sits at absolute position seq_len - q_len + i and sees key positions 0..that position.
    query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    key_pos = torch.arange(seq_len, device=query.device)
    is_future = (key_pos[None, :] > query_pos[:, None]).repeat(group_size, 1)
    scores.masked_fill_(is_future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.bmm(probs, values)
    attended = attended.reshape(num_kv_heads, group_size, q_len, head_dim).permute(2, 0, 1, 3)
    return attended.reshape(q_len, num_q_heads, head_dim)


def _gather_context(cache: Tensor, block_ids: Tensor, seq_len: int, scale: float) -> Tensor:
    """Contiguous float32 [num_kv_heads, seq_len, D] of one sequence, gathered from its blocks (times scale)."""
    blocks = as_bytes(cache).index_select(0, block_ids).view(cache.dtype)  # [num_blocks, H, B, D]
    num_blocks, num_heads, block_size, head_dim = blocks.shape
    context = blocks.permute(1, 0, 2, 3).reshape(num_heads, num_blocks * block_size, head_dim)[:, :seq_len]
    return dequantize(context, scale)
