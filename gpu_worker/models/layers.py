"""Decoder building blocks: RMSNorm, gated MLP and paged attention over the KV pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.gpu_worker.models.model_config import ModelConfig
from pagedserve.gpu_worker.models.rope import Rotation, rotate

if TYPE_CHECKING:
    from pagedserve.kernels.ops import AttentionOps


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


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight in the model dtype."""

    def __init__(self, size: int, eps: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_parameter(size, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused into one matmul."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = empty_parameter(2 * config.intermediate_size, config.hidden_size, device=device, dtype=dtype)
        self.down_proj = empty_parameter(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


class PagedAttention(nn.Module):
    """Self-attention whose keys and values live in the paged pool: project, rotate, write K/V, attend."""

    def __init__(self, config: ModelConfig, ops: AttentionOps, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.ops = ops
        qkv_size = config.q_size + 2 * config.kv_size
        self.qkv_proj = empty_parameter(qkv_size, config.hidden_size, device=device, dtype=dtype)
        self.qkv_bias = empty_parameter(qkv_size, device=device, dtype=dtype) if config.has_qkv_bias else None
        self.o_proj = empty_parameter(config.hidden_size, config.q_size, device=device, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.has_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, device, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, device, dtype)
        self.scale = config.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, rotation: Rotation, meta: AttentionMetadata, layer_cache: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, hidden]; layer_cache: [2, num_blocks, Hkv, block_size, D], this layer's K and V pools."""
        cfg = self.config
        num_tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        qk, v = qkv.split([cfg.q_size + cfg.kv_size, cfg.kv_size], dim=-1)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim).contiguous()
        qk = qk.reshape(num_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # q and k heads are adjacent in the fused projection: one rotation pass covers both.
        q, k = rotate(qk, rotation).split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        key_cache, value_cache = layer_cache[0], layer_cache[1]
        self.ops.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        self.ops.paged_attention(
            out, q, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, self.scale,
        )
        return F.linear(out.view(num_tokens, cfg.q_size), self.o_proj)
