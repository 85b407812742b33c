"""Each supported architecture generates exactly Hugging Face's greedy tokens through the paged worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from pagedserve.contract.model_format import DeviceKind
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, load_worker, make_sequences

NUM_NEW_TOKENS = 20
BLOCK_SIZE = 4
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [100, 3], [64, 64, 12, 9, 55, 31, 77, 8, 19, 120, 4], [1]]
# Prompt 2 (11 tokens) is prefilled over two steps: 6 tokens, then 5, crossing a block boundary.
FIRST_CHUNKS = {2: 6}
_TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.2,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _llama_gqa_tied() -> PretrainedConfig:
    return LlamaConfig(**_TINY, tie_word_embeddings=True)


def _llama3_rope_scaling() -> PretrainedConfig:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return LlamaConfig(**_TINY, rope_parameters=rope)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_TINY, sliding_window=None)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(**_TINY)


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_TINY, head_dim=24)


DEVICES = [
    pytest.param(DeviceKind.CPU, id="cpu"),
    pytest.param(DeviceKind.CUDA, id="cuda", marks=NEEDS_GPU),
]
ARCHITECTURES = pytest.mark.parametrize(
    "make_config", [_llama_gqa_tied, _llama3_rope_scaling, _mistral, _qwen2, _qwen3],
    ids=["llama-gqa-tied", "llama3-rope-scaling", "mistral", "qwen2", "qwen3"],
)


def _save_tiny_model(config: PretrainedConfig, directory: Path) -> Path:
    torch.manual_seed(0)
    # transformers leaves from_config unannotated.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(directory)
    return directory


def _hf_greedy(model_dir: Path, prompt: list[int]) -> list[int]:
    # transformers leaves PreTrainedModel.eval unannotated.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NUM_NEW_TOKENS, do_sample=False)
    new_tokens: list[int] = out[0, len(prompt):].tolist()
    return new_tokens


@ARCHITECTURES
@pytest.mark.parametrize("device", DEVICES)
def test_batched_chunked_greedy_tokens_equal_transformers_generate(make_config, device, tmp_path: Path) -> None:
    model_dir = _save_tiny_model(make_config(), tmp_path)
    expected = [_hf_greedy(model_dir, prompt) for prompt in PROMPTS]
    driver = WorkerDriver(load_worker(model_dir, block_size=BLOCK_SIZE, device=device), BLOCK_SIZE, num_blocks=256)

    generated = driver.generate(make_sequences(PROMPTS, FIRST_CHUNKS), NUM_NEW_TOKENS)

    assert generated == expected


def test_stories260k_greedy_tokens_equal_golden_reference() -> None:
    golden = json.loads((STORIES_DIR / "golden_greedy.json").read_text())
    driver = WorkerDriver(load_worker(STORIES_DIR, block_size=BLOCK_SIZE), BLOCK_SIZE, num_blocks=64)

    generated = driver.generate(make_sequences([golden["prompt_ids"]], {0: 3}), len(golden["greedy_new_ids"]))

    assert generated == [golden["greedy_new_ids"]]
