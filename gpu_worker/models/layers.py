"""Decoder building blocks: RMSNorm, gated MLP and paged attention over the KV pool, on the device's KernelOps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear, QuantizedRows, linear, quantized_for
from pagedserve.gpu_worker.models.model_config import ModelConfig
from pagedserve.gpu_worker.models.rope import Rotation
from pagedserve.gpu_worker.parallel.group import SINGLE_RANK, ParallelGroup

if TYPE_CHECKING:
    from pagedserve.kernels.ops import KernelOps


def empty_parameter(*shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised frozen parameter; the loader fills it."""
    # Weights are always filled by the loader (files or seeded dummy values), so no init cost here.
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV pool; shared by every layer of one forward pass.

    slot_mapping: [T] int64, pool slot of each token (-1 for padding); block_tables: [S, max_blocks] int32;
    seq_lens: [S] int32 context length after the step; query_start_loc: [S + 1] int32 cumulative query rows.
    max_query_len / max_seq_len are host-side upper bounds, so no device sync is needed.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int


class AttentionBuffers(NamedTuple):
    """Query and output rows of attention at fixed addresses, shared by every layer: a forward captured in pieces
    runs attention outside its graphs, on these."""

    query: torch.Tensor  # [T, num_heads, head_dim]
    out: torch.Tensor  # same shape


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight in the model dtype."""

    def __init__(self, size: int, eps: float, ops: KernelOps, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(size, device=device, dtype=dtype)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, size] -> normalised copy."""
        return self.ops.rms_norm(x, self.weight, self.eps)

    if TYPE_CHECKING:  # nn.Module.__call__ runs forward (and any hooks) but is typed as returning Any
        __call__ = forward

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x in place (the residual stream), then returns the norm of the sum: one fused op."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def input_of(self, reader: nn.Parameter | Fp8Linear, residual: torch.Tensor,
                 previous: torch.Tensor | None) -> torch.Tensor | QuantizedRows:
        """The norm of residual (after residual += previous in place, when given) as the input of the linear
        layer reader: quantized in the same op when reader is an FP8 layer that would quantize it."""
        if quantized_for(reader, residual.shape[0]):
            if previous is None:
                return QuantizedRows(*self.ops.rms_norm_fp8(residual, self.weight, self.eps))
            return QuantizedRows(*self.ops.add_rms_norm_fp8(previous, residual, self.weight, self.eps))
        return self(residual) if previous is None else self.add_and_norm(previous, residual)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul.

    Under tensor parallelism config is the rank's (its intermediate columns): gate/up is column-parallel, down is
    row-parallel, and the partial outputs are summed over the group.
    """

    def __init__(self, config: ModelConfig, ops: KernelOps, device: torch.device, dtype: torch.dtype,
                 group: ParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.group = group
        self.gate_up_proj: nn.Parameter | Fp8Linear = empty_parameter(
            2 * config.intermediate_size, config.hidden_size, device=device, dtype=dtype)
        self.down_proj: nn.Parameter | Fp8Linear = empty_parameter(
            config.hidden_size, config.intermediate_size, device=device, dtype=dtype)
        self.ops = ops

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj, self.ops)
        activated: torch.Tensor | QuantizedRows = (
            QuantizedRows(*self.ops.silu_and_mul_fp8(gate_up)) if quantized_for(self.down_proj, gate_up.shape[0])
            else self.ops.silu_and_mul(gate_up))
        return self.group.all_reduce(linear(activated, self.down_proj, self.ops))

    if TYPE_CHECKING:
        __call__ = forward


class PagedAttention(nn.Module):
    """Self-attention whose keys and values live in the paged pool: project, rotate, write K/V, attend.

    Under tensor parallelism config is the rank's (its query and key/value heads): qkv is column-parallel by heads,
    o_proj row-parallel, its partial outputs summed over the group.
    """

    def __init__(self, config: ModelConfig, ops: KernelOps, device: torch.device, dtype: torch.dtype,
                 group: ParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config
        self.group = group
        self.ops = ops
        qkv_size = config.q_size + 2 * config.kv_size
        self.qkv_proj: nn.Parameter | Fp8Linear = empty_parameter(qkv_size, config.hidden_size, device=device,
                                                                   dtype=dtype)
        self.qkv_bias = empty_parameter(qkv_size, device=device, dtype=dtype) if config.has_qkv_bias else None
        self.o_proj: nn.Parameter | Fp8Linear = empty_parameter(config.hidden_size, config.q_size, device=device,
                                                                dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.has_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, device, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, device, dtype)
        self.scale = config.head_dim**-0.5
        # An FP8 KV pool holds k / k_scale and v / v_scale: the checkpoint's, else calibrated (fp8_kv_scales.py).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.has_checkpoint_kv_scales = False

    def project(
        self, x: torch.Tensor | QuantizedRows, rotation: Rotation, slot_mapping: torch.Tensor,
        layer_cache: torch.Tensor, buffers: AttentionBuffers | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] (or QuantizedRows of it); layer_cache: [2, num_blocks, Hkv, block_size, D], this layer's
        K and V pools. Projects x, rotates q and k, writes k and v into their slots; returns (q, an output buffer for
        attend), in buffers when given."""
        cfg = self.config
        qkv = linear(x, self.qkv_proj, self.ops, self.qkv_bias)
        if self.q_norm is not None and self.k_norm is not None:
            qkv = self._norm_heads(qkv, self.q_norm, self.k_norm)
        query = self.ops.rotary_write_kv(qkv, rotation.cos, rotation.sin, layer_cache[0], layer_cache[1],
                                         slot_mapping, cfg.num_heads, cfg.num_kv_heads, self.k_scale, self.v_scale)
        if buffers is None:
            return query, torch.empty_like(query)
        buffers.query.copy_(query)
        return buffers.query, buffers.out

    def attend(self, out: torch.Tensor, query: torch.Tensor, meta: AttentionMetadata, key_cache: torch.Tensor,
               value_cache: torch.Tensor) -> None:
        """out = attention of query's rows over their paged context (the only part that reads the metadata);
        key_cache, value_cache: this layer's pools."""
        self.ops.paged_attention(
            out, query, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, self.scale, self.k_scale, self.v_scale,
        )

    def output(self, out: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(linear(out.view(out.shape[0], self.config.q_size), self.o_proj, self.ops))

    def _norm_heads(self, qkv: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of the q and k heads (before rotary); v passes through."""
        cfg = self.config
        q, k, v = torch.split(qkv, [cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q_norm(q.reshape(-1, cfg.head_dim)).view(-1, cfg.q_size)
        k = k_norm(k.reshape(-1, cfg.head_dim)).view(-1, cfg.kv_size)
        return torch.cat((q, k, v), dim=-1)
