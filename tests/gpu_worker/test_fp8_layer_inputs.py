"""The norms and SiLU-and-mul that quantize an FP8 layer's input for it (GPU, compute capability 8.9 or later): a
decoder layer with FP8 weights gives the same bits whether the producing op or the layer quantizes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import torch

from benchmarks.model_shapes import ModelShape
from pagedserve.contract.model_format import DType, LoadFormat, Quantization
from pagedserve.gpu_worker.models import layers
from pagedserve.gpu_worker.models.decoder import DecoderLayer
from pagedserve.gpu_worker.weights import load_model
from pagedserve.kernels.ops import get_kernel_ops
from tests.gpu_marks import NEEDS_FP8_GPU

pytestmark = NEEDS_FP8_GPU


@pytest.mark.parametrize("dtype", [DType.BFLOAT16, DType.FLOAT16])
@pytest.mark.parametrize(("num_tokens", "fused"), [(64, True), (300, True), (4, False)])
def test_norms_and_activation_quantize_for_the_fp8_layer_reading_them_with_the_same_bits(
    dtype: DType, num_tokens: int, fused: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where an FP8 layer would quantize its input (beyond the GEMV's rows), the norm or SiLU-and-mul producing it
    quantizes instead: the layer's outputs, K/V writes and residual stream are the same bits as with the layer
    quantizing; at 4 rows (the GEMV, which reads the model dtype) nothing is quantized."""
    shape = ModelShape("fused", hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=768,
                       vocab_size=512, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(shape.to_hf_config()))
    cuda = torch.device("cuda")
    ops = get_kernel_ops(cuda)
    loaded = load_model(tmp_path, dtype, cuda, LoadFormat.DUMMY, 0, ops, Quantization.FP8)
    torch_dtype = loaded.dtype
    layer = cast(DecoderLayer, loaded.model.layers[0])
    fused_calls: list[str] = []

    def counted(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        op = getattr(ops, name)

        def call(*args: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
            fused_calls.append(name)
            return cast(tuple[torch.Tensor, torch.Tensor], op(*args))
        return call

    for name in ("rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8"):
        monkeypatch.setattr(ops, name, counted(name))
    generator = torch.Generator(device="cuda").manual_seed(num_tokens)
    residual, previous = (torch.randn(num_tokens, 256, generator=generator, device="cuda").to(torch_dtype)
                          for _ in range(2))
    rotation = loaded.model.rotary(torch.arange(num_tokens, device="cuda"), torch_dtype)
    slots = torch.arange(num_tokens, device="cuda")
    cache = torch.zeros(2, -(-num_tokens // 16), 2, 16, 64, dtype=torch_dtype, device="cuda")

    def run(first_layer: bool) -> list[torch.Tensor]:
        stream, layer_cache = residual.clone(), cache.clone()
        query, _ = layer.before_attention(None if first_layer else previous, stream, rotation, slots, layer_cache,
                                          None)
        mlp_out = layer.after_attention(query, stream)  # the rotated query stands in for attention's output
        return [query, layer_cache, stream, mlp_out]

    runs = {first: run(first) for first in (True, False)}
    # The first layer's input norm has no residual add; each layer's post-attention norm has one.
    expected_calls = ["rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8"] + ["add_rms_norm_fp8"] * 2 + [
        "silu_and_mul_fp8"]
    assert sorted(fused_calls) == (sorted(expected_calls) if fused else [])
    monkeypatch.setattr(layers, "quantized_for", lambda weight, num_rows: False)
    for first, got in runs.items():
        for tensor, expected in zip(got, run(first), strict=True):
            assert torch.equal(tensor, expected)
