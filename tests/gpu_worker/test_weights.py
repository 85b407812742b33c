"""Loading weights: sharded safetensors, seeded dummy weights, dtypes and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedserve.contract.model_format import DType, LoadFormat
from pagedserve.gpu_worker.devices import torch_dtype
from pagedserve.gpu_worker.errors import ModelLoadError
from pagedserve.gpu_worker.models.decoder import DecoderLayer
from pagedserve.gpu_worker.weights import LoadedModel, load_model
from pagedserve.kernels.reference import TorchReferenceOps
from tests.gpu_worker.harness import STORIES_DIR

CPU = torch.device("cpu")


def _load(model_dir: Path, dtype: DType = DType.FLOAT32, load_format: LoadFormat = LoadFormat.AUTO,
          seed: int = 0) -> LoadedModel:
    return load_model(model_dir, dtype, CPU, load_format, seed, TorchReferenceOps())


def _state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def _config_only(tmp_path: Path, **changes: object) -> Path:
    config = json.loads((STORIES_DIR / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_sharded_index_loads_the_same_weights_as_one_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    # transformers leaves from_config unannotated.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")

    single, sharded = _state(_load(tmp_path / "single")), _state(_load(tmp_path / "sharded"))

    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)


def test_fused_projections_hold_the_checkpoint_tensors_in_order() -> None:
    tensors = load_file(str(STORIES_DIR / "model.safetensors"))
    layer = cast(DecoderLayer, _load(STORIES_DIR).model.layers[1])  # nn.ModuleList items are typed as Module
    prefix = "model.layers.1."

    expected_qkv = torch.cat([tensors[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    expected_gate_up = torch.cat([tensors[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert isinstance(layer.attn.qkv_proj, torch.Tensor) and isinstance(layer.mlp.gate_up_proj, torch.Tensor)
    assert torch.equal(layer.attn.qkv_proj, expected_qkv)
    assert torch.equal(layer.mlp.gate_up_proj, expected_gate_up)


def test_dummy_weights_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    model_dir = _config_only(tmp_path)

    first = _state(_load(model_dir, load_format=LoadFormat.DUMMY, seed=3))
    again = _state(_load(model_dir, load_format=LoadFormat.DUMMY, seed=3))
    other = _state(_load(model_dir, load_format=LoadFormat.DUMMY, seed=4))

    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["layers.0.attn.qkv_proj"], other["layers.0.attn.qkv_proj"])
    assert torch.equal(first["norm.weight"], torch.ones(64))
    assert abs(first["layers.0.mlp.down_proj"].std().item() - 0.02) < 0.002


@pytest.mark.parametrize("dtype", [DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16])
def test_weights_load_in_the_dtype_asked_for(dtype: DType) -> None:
    loaded = _load(STORIES_DIR, dtype=dtype)

    assert loaded.dtype == torch_dtype(dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {torch_dtype(dtype)}
    assert loaded.weight_bytes == sum(p.numel() for p in loaded.model.parameters()) * torch_dtype(dtype).itemsize


def test_auto_dtype_follows_the_config(tmp_path: Path) -> None:
    model_dir = _config_only(tmp_path, torch_dtype="bfloat16")

    assert _load(model_dir, dtype=DType.AUTO, load_format=LoadFormat.DUMMY).dtype == torch.bfloat16


def test_missing_weight_files_name_the_dummy_format(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="dummy"):
        _load(_config_only(tmp_path))


def test_missing_tensor_is_a_load_error(tmp_path: Path) -> None:
    shutil.copy(STORIES_DIR / "config.json", tmp_path / "config.json")
    tensors = load_file(str(STORIES_DIR / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))

    with pytest.raises(ModelLoadError, match=r"layers\.2\.mlp\.gate_up_proj\[1\]"):
        _load(tmp_path)


def test_unsupported_architecture_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        _load(_config_only(tmp_path, architectures=["GPT2LMHeadModel"]), load_format=LoadFormat.DUMMY)
