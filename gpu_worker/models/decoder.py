"""The causal decoder shared by Llama, Mistral, Qwen2 and Qwen3, with Hugging Face weight-name loading."""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import nn

from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear
from pagedserve.gpu_worker.models.layers import (
    AttentionBuffers,
    AttentionMetadata,
    GatedMLP,
    PagedAttention,
    RMSNorm,
    empty_parameter,
)
from pagedserve.gpu_worker.models.model_config import ModelConfig
from pagedserve.gpu_worker.models.rope import RotaryEmbedding, Rotation
from pagedserve.gpu_worker.parallel.group import SINGLE_RANK, ParallelGroup
from pagedserve.gpu_worker.parallel.sharding import ShardLayout, Split, TensorSlice
from pagedserve.gpu_worker.parallel.vocab import VocabParallel

if TYPE_CHECKING:
    from pagedserve.kernels.ops import KernelOps

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Hugging Face per-layer names -> (our parameter under layers.{i}, shard index in a fused parameter or None, how the
# weight is divided among tensor-parallel ranks).
_LAYER_PARAMS: dict[str, tuple[str, int | None, Split]] = {
    "self_attn.q_proj.weight": ("attn.qkv_proj", 0, Split.Q_ROWS),
    "self_attn.k_proj.weight": ("attn.qkv_proj", 1, Split.KV_ROWS),
    "self_attn.v_proj.weight": ("attn.qkv_proj", 2, Split.KV_ROWS),
    "self_attn.q_proj.bias": ("attn.qkv_bias", 0, Split.Q_ROWS),
    "self_attn.k_proj.bias": ("attn.qkv_bias", 1, Split.KV_ROWS),
    "self_attn.v_proj.bias": ("attn.qkv_bias", 2, Split.KV_ROWS),
    "self_attn.o_proj.weight": ("attn.o_proj", None, Split.Q_COLUMNS),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None, Split.WHOLE),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None, Split.WHOLE),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj", 0, Split.MLP_ROWS),
    "mlp.up_proj.weight": ("mlp.gate_up_proj", 1, Split.MLP_ROWS),
    "mlp.down_proj.weight": ("mlp.down_proj", None, Split.MLP_COLUMNS),
    "input_layernorm.weight": ("input_norm.weight", None, Split.WHOLE),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", None, Split.WHOLE),
}
_TOP_PARAMS: dict[str, tuple[str, Split]] = {
    "model.embed_tokens.weight": ("embed_tokens", Split.VOCAB_ROWS),
    "model.norm.weight": ("norm.weight", Split.WHOLE),
    "lm_head.weight": ("lm_head", Split.VOCAB_ROWS),
}
_VOCAB_PARAMS = ("embed_tokens", "lm_head")


class AttentionCall(NamedTuple):
    """Where a forward pass stops for attention: layer `layer` attends with `query`, writing into `out`."""

    layer: int
    query: torch.Tensor
    out: torch.Tensor


# Yields an AttentionCall per layer, to be run before resuming; returns the final hidden states.
ForwardPieces = Generator[AttentionCall, None, torch.Tensor]


def run_pieces(pieces: ForwardPieces, attend: Callable[[AttentionCall], None]) -> torch.Tensor:
    """Runs a forward pass's pieces, calling attend at each stop; returns its final hidden states."""
    while True:
        try:
            call = next(pieces)
        except StopIteration as finished:
            return cast(torch.Tensor, finished.value)  # a ForwardPieces generator's return value
        attend(call)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: residual += attn(norm(residual)), then residual += mlp(norm(residual)).

    The residual stream is updated in place, each addition fused with the norm that reads the sum; a layer
    returns its MLP output, which the next layer (or the final norm) adds in. It runs in two parts around its
    attention, which is the only part that reads the step's attention metadata.
    """

    def __init__(self, config: ModelConfig, ops: KernelOps, device: torch.device, dtype: torch.dtype,
                 group: ParallelGroup) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, device, dtype)
        self.attn = PagedAttention(config, ops, device, dtype, group)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, device, dtype)
        self.mlp = GatedMLP(config, ops, device, dtype, group)

    def before_attention(
        self, previous: torch.Tensor | None, residual: torch.Tensor, rotation: Rotation, slot_mapping: torch.Tensor,
        layer_cache: torch.Tensor, buffers: AttentionBuffers | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """previous: the last layer's MLP output, still to be added (None for the first layer); residual: [T,
        hidden], updated in place. Returns the attention's query and output buffer."""
        hidden = self.input_norm.input_of(self.attn.qkv_proj, residual, previous)
        return self.attn.project(hidden, rotation, slot_mapping, layer_cache, buffers)

    def after_attention(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Adds the attention's projection to residual; returns this layer's MLP output."""
        return self.mlp(self.post_attention_norm.input_of(self.mlp.gate_up_proj, residual, self.attn.output(out)))


class DecoderForCausalLM(nn.Module):
    """Token ids -> hidden states over one flat batch of sequences; logits only for the rows asked.

    The forward pass does no host synchronisation, so a decode step can be captured in a CUDA graph, and the
    parts between attentions (pieces) can be captured for any step.

    Under tensor parallelism (group of more than one rank) it holds rank group.rank's slices (parallel/sharding.py)
    and self.config is that rank's config (its heads and columns); every rank runs every step.
    """

    def __init__(self, config: ModelConfig, ops: KernelOps, device: torch.device, dtype: torch.dtype,
                 group: ParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.shards = ShardLayout(config, group.rank, group.size)
        self.vocab = VocabParallel(self.shards, group)
        self.ops = ops
        config = self.config = self.shards.local_config
        vocab_rows = self.shards.vocab_rows_per_rank
        self.embed_tokens = empty_parameter(vocab_rows, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, ops, device, dtype, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, device, dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, device)
        # An FP8 layer once quantize_lm_head_of (fp8_weights.py) has replaced it.
        self.lm_head: nn.Parameter | Fp8Linear
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = empty_parameter(vocab_rows, config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():  # the last rank's padding rows: never looked up, their logits cut off
            self.embed_tokens[self.shards.num_vocab_rows :].zero_()
            self.lm_head[self.shards.num_vocab_rows :].zero_()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64; kv_cache: [L, 2, N, Hkv, B, D]; returns [T, hidden] model dtype."""
        return run_pieces(self.pieces(input_ids, positions, meta.slot_mapping, kv_cache),
                          lambda call: self.attend(call, meta, kv_cache))

    if TYPE_CHECKING:  # nn.Module.__call__ runs forward (and any hooks) but is typed as returning Any
        __call__ = forward

    def pieces(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
        buffers: AttentionBuffers | None = None,
    ) -> ForwardPieces:
        """The forward pass cut at each layer's attention, which the caller runs (attend) before resuming. A piece
        reads only input_ids, positions, slot_mapping, the weights, the pool and buffers (where attention's query
        and output rows go, when given), never the attention metadata."""
        residual = self.vocab.embed(input_ids, self.embed_tokens)
        rotation = self.rotary(positions, residual.dtype)
        output: torch.Tensor | None = None
        for index, layer in enumerate(cast("Iterable[DecoderLayer]", self.layers)):
            query, out = layer.before_attention(output, residual, rotation, slot_mapping, kv_cache[index], buffers)
            yield AttentionCall(index, query, out)
            output = layer.after_attention(out, residual)
        return self.norm(residual) if output is None else self.norm.add_and_norm(output, residual)

    def attend(self, call: AttentionCall, meta: AttentionMetadata, kv_cache: torch.Tensor) -> None:
        attention, key_cache, value_cache = self.layer_attention(kv_cache, call.layer)
        attention.attend(call.out, call.query, meta, key_cache, value_cache)

    def layer_attention(self, kv_cache: torch.Tensor, layer: int) -> tuple[PagedAttention, torch.Tensor, torch.Tensor]:
        """The layer's attention and its key and value pools in kv_cache ([layers, 2, ...])."""
        layer_cache = kv_cache[layer]
        return cast(DecoderLayer, self.layers[layer]).attn, layer_cache[0], layer_cache[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, hidden] -> [R, vocab] in the model's dtype (the whole vocabulary on every rank)."""
        return self.vocab.logits(hidden, self.lm_head, self.ops)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors into the (fused) parameters; every parameter must be covered."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = {(name, shard) for name, shard in self._expected_shards(params)}
        loaded: set[tuple[str, int | None]] = set()
        for hf_name, tensor in weights:
            target = self._map_name(hf_name)
            if target is None:
                continue
            name, shard, _ = target
            if name not in params:
                raise ModelLoadError(f"weight {hf_name} has no parameter {name} in this architecture")
            destination = self._shard_view(params[name], name, shard)
            if destination.shape != tensor.shape:
                raise ModelLoadError(
                    f"weight {hf_name}: shape {tuple(tensor.shape)}, expected {tuple(destination.shape)}")
            destination.copy_(tensor)
            loaded.add((name, shard))
        missing = sorted(f"{name}[{shard}]" if shard is not None else name for name, shard in expected - loaded)
        if missing:
            raise ModelLoadError(f"weights missing for: {', '.join(missing[:8])}")

    def weight_slice(self, hf_name: str) -> tuple[bool, TensorSlice | None]:
        """(whether the Hugging Face weight hf_name is loaded at all, the slice of it this rank reads: None for the
        whole), so that a loader reads only this rank's part of each file."""
        target = self._map_name(hf_name)
        if target is None:
            return False, None
        return True, self.shards.slice_of(target[2])

    def _map_name(self, hf_name: str) -> tuple[str, int | None, Split] | None:
        if hf_name in _TOP_PARAMS:
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                return None
            name, split = _TOP_PARAMS[hf_name]
            return name, None, split
        match = _LAYER_NAME.fullmatch(hf_name)
        if match is None or match.group(2) not in _LAYER_PARAMS:
            return None  # e.g. rotary_emb.inv_freq of old checkpoints: recomputed, not loaded
        name, shard, split = _LAYER_PARAMS[match.group(2)]
        return f"layers.{match.group(1)}.{name}", shard, split

    def _expected_shards(self, params: dict[str, nn.Parameter]) -> list[tuple[str, int | None]]:
        fused = {"attn.qkv_proj": 3, "attn.qkv_bias": 3, "mlp.gate_up_proj": 2}
        shards: list[tuple[str, int | None]] = []
        for name in params:
            if name == "lm_head" and self.config.tie_word_embeddings:
                continue
            count = next((n for suffix, n in fused.items() if name.endswith(suffix)), None)
            shards.extend([(name, i) for i in range(count)] if count else [(name, None)])
        return shards

    def _shard_view(self, param: torch.Tensor, name: str, shard: int | None) -> torch.Tensor:
        if name in _VOCAB_PARAMS:
            return param[: self.shards.num_vocab_rows]  # without the last rank's padding rows
        if shard is None:
            return param
        cfg = self.config
        if name.endswith("gate_up_proj"):
            sizes = [cfg.intermediate_size, cfg.intermediate_size]
        else:
            sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return torch.split(param, sizes, dim=0)[shard]
