"""FP8 linear layers on the CPU reference path: per-channel quantization, the layer's math, quantizing a loaded
model, and loading checkpoints already in FP8 (vLLM / compressed-tensors layout)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pagedserve.contract.model_format import DType, LoadFormat, Quantization
from pagedserve.gpu_worker import fp8_support
from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.models.decoder import DecoderLayer
from pagedserve.gpu_worker.models.fp8_linear import Fp8Linear
from pagedserve.gpu_worker.parallel.group import ParallelGroup
from pagedserve.gpu_worker.weights import LoadedModel, load_model
from pagedserve.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_per_row
from pagedserve.kernels.ops import get_kernel_ops
from tests.gpu_worker.harness import STORIES_DIR

CPU = torch.device("cpu")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _load(model_dir: Path, quantization: Quantization = Quantization.NONE) -> LoadedModel:
    return load_model(model_dir, DType.FLOAT32, CPU, LoadFormat.AUTO, 0, get_kernel_ops(CPU), quantization)


def test_per_channel_quantization_keeps_each_channel_within_fp8_error() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=generator) * torch.logspace(-3, 1, 64)[:, None]
    quantized, scale = quantize_per_row(weight)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (64, 1)
    torch.testing.assert_close(scale, weight.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    error = (quantized.float() * scale - weight).abs()
    # Half an e4m3 step: 2**-4 relative for normal values, 2**-10 of the scale for subnormal ones.
    assert (error <= weight.abs() * 2.0**-4 + scale * 2.0**-10 + 1e-12).all()
    assert (quantized.float().abs().amax(dim=1) == FP8_MAX).all()  # each channel's largest value is exact


def test_cpu_layer_is_the_matmul_with_the_dequantized_weight() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 32, generator=generator).bfloat16()
    layer = Fp8Linear.quantize(weight, get_kernel_ops(CPU))
    x, bias = torch.randn(5, 32, generator=generator).bfloat16(), torch.randn(48, generator=generator).bfloat16()
    assert not layer.use_scaled_mm
    expected = F.linear(x, (layer.weight.float() * layer.weight_scale[:, None]).bfloat16(), bias)
    assert torch.equal(layer(x, bias), expected)
    relative = (layer(x).float() - F.linear(x, weight).float()).norm() / F.linear(x, weight).float().norm()
    assert relative < 0.05


def test_quantization_fp8_replaces_every_decoder_linear_and_keeps_the_rest() -> None:
    plain, quantized = _load(STORIES_DIR), _load(STORIES_DIR, Quantization.FP8)
    layers = [m for m in quantized.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 4 * quantized.config.num_layers
    assert all(layer.weight.dtype == FP8_DTYPE for layer in layers)
    assert quantized.model.embed_tokens.dtype == torch.float32  # embeddings, norms and LM head stay
    linear_elements = sum(layer.weight.numel() for layer in layers)
    # Each linear weight goes from 4 bytes to 1, plus a float32 scale per output channel.
    scales = sum(layer.weight_scale.numel() for layer in layers)
    assert quantized.weight_bytes == plain.weight_bytes - 3 * linear_elements + 4 * scales


def _write_fp8_checkpoint(tmp_path: Path, config_extra: Mapping[str, object], drop: str | None = None,
                          replace: Mapping[str, torch.Tensor] | None = None) -> Path:
    """stories260K re-saved the way llm-compressor writes FP8: per-tensor e4m3 weights and scales, KV scales; drop:
    a tensor left out; replace: tensors saved in place of those of the same names."""
    directory = tmp_path / "fp8"
    shutil.copytree(STORIES_DIR, directory, ignore=shutil.ignore_patterns("raw", "*.safetensors"))
    tensors = load_file(str(STORIES_DIR / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if any(f".{p}.weight" in name for p in PROJECTIONS):
            scale = tensor.abs().amax() / FP8_MAX
            out[name] = (tensor / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
            out[name.replace(".weight", ".input_scale")] = torch.ones(1)
        else:
            out[name] = tensor
    for layer in range(5):
        out[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.125)
        out[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.25)
    if drop is not None:
        del out[drop]
    out.update(replace or {})
    save_file(out, str(directory / "model.safetensors"))
    config = json.loads((STORIES_DIR / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_extra}))
    return directory


COMPRESSED_TENSORS = {"quantization_config": {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                  "input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}},
}}


def test_fp8_checkpoint_loads_as_it_is(tmp_path: Path) -> None:
    directory = _write_fp8_checkpoint(tmp_path, COMPRESSED_TENSORS)
    loaded = _load(directory)
    saved = load_file(str(directory / "model.safetensors"))
    assert loaded.config.num_layers == 5
    for index, layer in enumerate(cast("list[DecoderLayer]", list(loaded.model.layers))):
        qkv = layer.attn.qkv_proj
        assert isinstance(qkv, Fp8Linear)
        prefix = f"model.layers.{index}.self_attn."
        expected_bytes = torch.cat([saved[f"{prefix}{p}_proj.weight"].view(torch.uint8) for p in "qkv"])
        assert torch.equal(qkv.weight.view(torch.uint8), expected_bytes)
        sizes = [loaded.config.q_size, loaded.config.kv_size, loaded.config.kv_size]
        expected_scales = torch.cat([saved[f"{prefix}{p}_proj.weight_scale"].expand(n)
                                     for p, n in zip("qkv", sizes, strict=True)])
        assert torch.equal(qkv.weight_scale, expected_scales)
        assert (layer.attn.k_scale, layer.attn.v_scale) == (0.125, 0.25)
    assert torch.equal(loaded.model.embed_tokens, saved["model.embed_tokens.weight"])


def test_fp8_checkpoint_missing_a_scale_is_refused_naming_it(tmp_path: Path) -> None:
    directory = _write_fp8_checkpoint(tmp_path, {"quantization_config": {"quant_method": "fp8"}},
                                      drop="model.layers.3.mlp.up_proj.weight_scale")
    with pytest.raises(ModelLoadError, match="layer 3 gate_up_proj\\[1\\] weight_scale"):
        _load(directory)


@pytest.mark.parametrize("scale", [torch.tensor(0.0), torch.tensor(-0.5), torch.tensor(float("inf")),
                                   torch.tensor(float("nan")), torch.tensor(1e-40), torch.tensor([0.1, 0.2])],
                         ids=["zero", "negative", "inf", "nan", "subnormal", "two-values"])
def test_fp8_checkpoint_kv_scale_that_the_kernels_cannot_take_is_refused_naming_it(tmp_path: Path,
                                                                                   scale: torch.Tensor) -> None:
    name = "model.layers.2.self_attn.k_scale"
    directory = _write_fp8_checkpoint(tmp_path, COMPRESSED_TENSORS, replace={name: scale})
    with pytest.raises(ModelLoadError, match=f"KV scale {name} must be"):
        _load(directory)


def test_fp8_checkpoint_under_tensor_parallelism_is_refused_before_loading(tmp_path: Path) -> None:
    directory = _write_fp8_checkpoint(tmp_path, {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ModelLoadError, match="FP8 checkpoint, which tensor parallelism cannot slice"):
        load_model(directory, DType.FLOAT32, CPU, LoadFormat.AUTO, 0, get_kernel_ops(CPU), Quantization.NONE,
                   ParallelGroup(1, 2))


@pytest.mark.parametrize("quantization", [
    {"quant_method": "fp8", "weight_block_size": [128, 128]},
    {"quant_method": "awq"},
    {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
], ids=["block-wise", "awq", "int4"])
def test_unsupported_quantized_checkpoints_are_refused(tmp_path: Path, quantization: dict[str, object]) -> None:
    directory = _write_fp8_checkpoint(tmp_path, {"quantization_config": quantization})
    with pytest.raises(ModelLoadError, match="not supported|unsupported"):
        _load(directory)


def test_fp8_on_a_cuda_device_below_compute_capability_8_9_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    with pytest.raises(ModelLoadError, match="compute capability 8.9 or later.*A100 is 8.0"):
        fp8_support.require_fp8_device(torch.device("cuda", 0), "--kv-cache-dtype fp8")
    fp8_support.require_fp8_device(CPU, "--kv-cache-dtype fp8")  # the CPU runs the reference
