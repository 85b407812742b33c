"""Per-layer FP8 KV scales calibrated at load: transformers' own key / value amax over the same tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pagedserve.contract.model_format import KVCacheDType
from pagedserve.gpu_worker.fp8_kv_scales import (
    CALIBRATION_TOKENS,
    K_SCALE_HEADROOM,
    V_SCALE_HEADROOM,
    calibrate_kv_scales,
)
from pagedserve.gpu_worker.fp8_weights import _layers
from tests.gpu_worker.harness import load_worker
from tests.gpu_worker.test_models import _qwen2, _save_tiny_model

SEED = 0


def _transformers_kv_amax(model_dir: Path, token_ids: list[int], num_layers: int) -> list[tuple[float, float]]:
    """Each layer's largest |key| and |value| (after rotary), as transformers' attention receives them."""
    amax = [(0.0, 0.0)] * num_layers

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        amax[cast("int", module.layer_idx)] = (float(key.abs().max()), float(value.abs().max()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("kv_amax_sdpa", attention)
    # transformers leaves PreTrainedModel.eval unannotated.
    model = AutoModelForCausalLM.from_pretrained(  # type: ignore[no-untyped-call]
        model_dir, dtype=torch.float32, attn_implementation="kv_amax_sdpa").eval()
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    return amax


def test_fp8_kv_scales_are_each_layers_calibration_amax_over_the_headroom(tmp_path: Path) -> None:
    model_dir = _save_tiny_model(_qwen2(), tmp_path)  # q/k/v biases: the scales differ per layer and per K / V
    worker = load_worker(model_dir, kv_cache_dtype=KVCacheDType.FP8, seed=SEED)
    token_ids = torch.randint(0, 128, (CALIBRATION_TOKENS,), generator=torch.Generator().manual_seed(SEED)).tolist()
    layers = _layers(worker.loaded.model)
    amax = _transformers_kv_amax(model_dir, token_ids, len(layers))
    for layer, (k_amax, v_amax) in zip(layers, amax, strict=True):
        assert abs(layer.attn.k_scale - k_amax / K_SCALE_HEADROOM) <= 1e-5 * layer.attn.k_scale
        assert abs(layer.attn.v_scale - v_amax / V_SCALE_HEADROOM) <= 1e-5 * layer.attn.v_scale


def test_checkpoint_kv_scales_are_kept_by_calibration(tmp_path: Path) -> None:
    model_dir = _save_tiny_model(_qwen2(), tmp_path)
    worker = load_worker(model_dir)
    first, second = _layers(worker.loaded.model)
    first.attn.k_scale, first.attn.v_scale, first.attn.has_checkpoint_kv_scales = 0.125, 0.25, True
    scales = calibrate_kv_scales(worker.loaded.model, worker.device, SEED)
    assert scales[0] == (0.125, 0.25)
    assert scales[1] == (second.attn.k_scale, second.attn.v_scale) != (1.0, 1.0)
