"""FP8 weights: quantizing a loaded decoder's linear layers, and loading checkpoints that are already FP8.

Checkpoints in FP8 are the layout vLLM and compressed-tensors (llm-compressor) write: each linear layer's e4m3
`weight` with a float32 `weight_scale` (one per tensor, or one per output channel) and, for static activation
schemes, an `input_scale`; config.json describes them in `quantization_config`. Fused layers (q/k/v, gate/up)
get one scale per output channel, so shards of different per-tensor scales fuse without requantizing. Activation
scales are always computed per token at run time (at least as accurate as a static one), so `input_scale` is read
past. KV-cache scales (`self_attn.k_scale` / `v_scale`, or the older `k_proj.output_scale` / `v_proj.output_scale`)
become the layer's FP8 KV scales.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import torch
from torch import nn

from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM, DecoderLayer
from pagedserve.gpu_worker.models.fp8_linear import SCALED_MM_ALIGNMENT, Fp8Linear
from pagedserve.gpu_worker.models.layers import GatedMLP, PagedAttention
from pagedserve.kernels.fp8 import FP8_DTYPE, as_bytes

# Hugging Face projection -> (our fused layer attribute, shard index).
_PROJECTIONS: dict[str, tuple[str, int]] = {
    "self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1), "self_attn.v_proj": ("qkv_proj", 2),
    "self_attn.o_proj": ("o_proj", 0), "mlp.gate_proj": ("gate_up_proj", 0), "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.down_proj": ("down_proj", 0),
}
_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\."
                     r"(weight|weight_scale|input_scale)")
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)")
_FUSED_SHARDS = {"qkv_proj": 3, "gate_up_proj": 2}


def checkpoint_is_fp8(model_dir: Path) -> bool:
    """Whether config.json's quantization_config describes FP8 weights this loader reads; ModelLoadError for a
    quantization it does not (block-wise scales, integer formats, other methods)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    quantization = config.get("quantization_config")
    if quantization is None:
        return False
    method = quantization.get("quant_method")
    if method == "fp8":
        if quantization.get("weight_block_size") is not None:
            raise ModelLoadError("FP8 checkpoints with block-wise weight scales (weight_block_size) are not supported")
        return True
    if method == "compressed-tensors":
        for name, group in quantization.get("config_groups", {}).items():
            weights = group.get("weights") or {}
            if (weights.get("num_bits"), weights.get("type")) != (8, "float") or (
                weights.get("strategy") not in ("tensor", "channel")
            ):
                raise ModelLoadError(f"compressed-tensors group {name!r}: {weights} is not supported (only 8-bit "
                                     "float weights with tensor or channel scales are)")
        return True
    raise ModelLoadError(f"unsupported quantization_config.quant_method {method!r} (supported: fp8, "
                         "compressed-tensors FP8)")


def _layers(model: DecoderForCausalLM) -> list[DecoderLayer]:
    return list(cast("Iterable[DecoderLayer]", model.layers))  # nn.ModuleList items are typed as Module


def _linear_owners(model: DecoderForCausalLM) -> Iterator[tuple[PagedAttention | GatedMLP, str]]:
    """(module, attribute) of every linear layer that FP8 replaces; embeddings, norms and the LM head stay. Each
    owner's kernel ops become its FP8 layers' (they quantize the layers' inputs)."""
    for layer in _layers(model):
        yield layer.attn, "qkv_proj"
        yield layer.attn, "o_proj"
        yield layer.mlp, "gate_up_proj"
        yield layer.mlp, "down_proj"


def _replace(owner: nn.Module, attribute: str, layer: Fp8Linear) -> None:
    delattr(owner, attribute)  # a registered parameter cannot be overwritten by a module
    setattr(owner, attribute, layer)


def quantize_linears(model: DecoderForCausalLM) -> None:
    """Replaces each decoder block's linear weights (loaded in the model dtype) by FP8 layers, one at a time, so
    the device holds at most one model-dtype weight beside the FP8 ones."""
    for owner, attribute in _linear_owners(model):
        weight = getattr(owner, attribute)
        if isinstance(weight, Fp8Linear):
            continue
        _replace(owner, attribute, Fp8Linear.quantize(weight, owner.ops))
        del weight


def quantize_lm_head_of(model: DecoderForCausalLM) -> None:
    """Replaces the LM head (this rank's vocabulary rows) by an FP8 layer with one scale per row. A head tied to the
    embedding gets an e4m3 copy of its own: the embedding's lookups stay in the model dtype. ModelLoadError, before
    anything is allocated, for a head whose many-row products could not take FP8 tensor cores on a GPU (each step
    would dequantize it)."""
    head = model.lm_head
    if isinstance(head, Fp8Linear):
        return
    rows, columns = head.shape
    if head.is_cuda and (rows % SCALED_MM_ALIGNMENT or columns % SCALED_MM_ALIGNMENT):
        raise ModelLoadError(f"--quantize-lm-head: the LM head's {rows} x {columns} rows cannot take FP8 tensor cores "
                             f"(both sizes must be multiples of {SCALED_MM_ALIGNMENT}); serve without it")
    _replace(model, "lm_head", Fp8Linear.quantize(head, model.ops))


def fp8_linear_bytes(model: DecoderForCausalLM) -> int:
    """Bytes of the FP8 layers' weights and scales (buffers, which the model's parameters do not count)."""
    return sum(t.numel() * t.element_size() for module in model.modules() if isinstance(module, Fp8Linear)
               for t in module.buffers())


def load_fp8_checkpoint(model: DecoderForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Loads an FP8 checkpoint's tensors as they are: e4m3 weights and their scales into FP8 layers, KV scales
    into the attention layers, everything else through the model's own loader (which checks it is all there)."""
    device, dtype = model.embed_tokens.device, model.embed_tokens.dtype
    for owner, attribute in _linear_owners(model):
        weight = getattr(owner, attribute)
        _replace(owner, attribute, Fp8Linear.empty(weight.shape[0], weight.shape[1], device, dtype, owner.ops))
    loaded: set[tuple[int, str, int, str]] = set()
    rest: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors:
        if (match := _LINEAR.fullmatch(name)) is not None:
            layer_index, projection, kind = int(match.group(1)), match.group(2), match.group(3)
            if kind != "input_scale":
                _load_shard(model, _layer(model, layer_index), projection, kind, tensor, name)
                loaded.add((layer_index, *_PROJECTIONS[projection], kind))
        elif (match := _KV_SCALE.fullmatch(name)) is not None:
            attention = _layer(model, int(match.group(1))).attn
            setattr(attention, f"{match.group(2) or match.group(3)}_scale", _scalar(tensor, name))
            attention.has_checkpoint_kv_scales = True
        elif tensor.dtype == FP8_DTYPE:
            raise ModelLoadError(f"weight {name} is FP8, but only the linear layers of decoder blocks may be")
        else:
            rest.append((name, tensor))
    expected = {(index, attribute, shard, kind) for index in range(len(model.layers))
                for attribute in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
                for shard in range(_FUSED_SHARDS.get(attribute, 1)) for kind in ("weight", "weight_scale")}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"FP8 checkpoint misses {len(missing)} weights or scales, e.g. layer {missing[0][0]} "
                             f"{missing[0][1]}[{missing[0][2]}] {missing[0][3]}")
    model.load_weights(rest)


def _layer(model: DecoderForCausalLM, index: int) -> DecoderLayer:
    if index >= len(model.layers):
        raise ModelLoadError(f"checkpoint layer {index} is past the model's {len(model.layers)} layers")
    return _layers(model)[index]


def _load_shard(model: DecoderForCausalLM, decoder_layer: DecoderLayer, projection: str, kind: str,
                tensor: torch.Tensor, name: str) -> None:
    attribute, shard = _PROJECTIONS[projection]
    layer = getattr(decoder_layer.attn if projection.startswith("self_attn") else decoder_layer.mlp, attribute)
    assert isinstance(layer, Fp8Linear)  # load_fp8_checkpoint replaced every linear layer first
    sizes = _shard_sizes(model, attribute)
    start, rows = sum(sizes[:shard]), sizes[shard]
    if kind == "weight":
        destination = layer.weight[start:start + rows]
        if tensor.dtype != FP8_DTYPE or tensor.shape != destination.shape:
            raise ModelLoadError(f"weight {name}: {tensor.dtype} {tuple(tensor.shape)}, expected "
                                 f"{FP8_DTYPE} {tuple(destination.shape)}")
        as_bytes(destination).copy_(as_bytes(tensor))
    elif tensor.numel() in (1, rows):
        layer.weight_scale[start:start + rows].copy_(tensor.float().reshape(-1).expand(rows))
    else:
        raise ModelLoadError(f"scale {name} has shape {tuple(tensor.shape)}: expected one per tensor or one per "
                             f"output channel ({rows})")


def _shard_sizes(model: DecoderForCausalLM, attribute: str) -> list[int]:
    config = model.config
    if attribute == "qkv_proj":
        return [config.q_size, config.kv_size, config.kv_size]
    if attribute == "gate_up_proj":
        return [config.intermediate_size, config.intermediate_size]
    return [config.hidden_size]


def _scalar(tensor: torch.Tensor, name: str) -> float:
    """A KV scale: one finite number no smaller than float32's smallest normal. The attention kernels fold k_scale
    into the softmax scale, which a smaller one would take to zero (masked keys would then give NaN, not 0)."""
    if tensor.numel() != 1:
        raise ModelLoadError(f"KV scale {name} must be one number, got shape {tuple(tensor.shape)}")
    value, smallest = float(tensor.float().item()), torch.finfo(torch.float32).tiny
    if not (math.isfinite(value) and value >= smallest):
        raise ModelLoadError(f"KV scale {name} must be a finite number of at least {smallest:.3g}, got {value!r}")
    return value
