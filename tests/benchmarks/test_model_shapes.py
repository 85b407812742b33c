"""Named model shapes: published parameter counts, and directories pagedserve and transformers both accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model_shapes import SHAPES, read_shape, sampling_vocab_size, write_model_dir
from pagedserve.gpu_worker.models.model_config import ModelConfig


@pytest.mark.parametrize(("name", "num_parameters"), [
    ("llama-3.2-1b", 1_235_814_400), ("tinyllama-1.1b", 1_100_048_384), ("llama-3-8b", 8_030_261_248),
])
def test_shape_has_the_published_parameter_count(name: str, num_parameters: int) -> None:
    assert SHAPES[name].num_parameters == num_parameters


def test_llama_3_2_1b_directory_parses_as_the_llama3_shape(llama2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = write_model_dir(SHAPES["llama-3.2-1b"], tmp_path / "m", llama2_tokenizer_dir)
    config = ModelConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2048, 16, 32, 8, 64)
    assert (config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (8192, 128256, True)
    assert (config.rope_theta, config.max_position_embeddings, config.config_dtype) == (500000.0, 131072, "bfloat16")
    assert config.rope_scaling is not None and config.rope_scaling.factor == 32.0


def test_model_directory_holds_the_tokenizer_files(llama2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = write_model_dir(SHAPES["tinyllama-1.1b"], tmp_path / "m", llama2_tokenizer_dir)
    assert (model_dir / "tokenizer.json").read_bytes() == (llama2_tokenizer_dir / "tokenizer.json").read_bytes()
    assert read_shape(model_dir).num_parameters == 1_100_048_384


def test_prompt_ids_stay_below_the_smaller_vocabulary(llama2_tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = write_model_dir(SHAPES["llama-3.2-1b"], tmp_path / "m", llama2_tokenizer_dir)
    assert sampling_vocab_size(model_dir) == 32000
