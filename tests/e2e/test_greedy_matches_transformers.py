"""Through the real path (client -> control plane process -> worker process), greedy tokens equal
transformers' own greedy generate on the same weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import transformers

from pagedserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.conftest import copy_tokenizer
from tests.e2e.processes import running_cluster

pytestmark = pytest.mark.e2e

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They", "One day"]


def _generate_ids(stub: generation_service_pb2_grpc.GenerationServiceStub, prompt_ids: list[int],
                  max_tokens: int) -> list[int]:
    request = generation_service_pb2.GenerateRequest(
        token_ids=generation_service_pb2.TokenIds(ids=prompt_ids),
        sampling_params=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens),
    )
    return [t for chunk in stub.Generate(request, timeout=120) for t in chunk.token_ids]


def _hf_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    # transformers leaves PreTrainedModel.eval unannotated.
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    new_tokens: list[int] = out[0, len(prompt_ids):].tolist()
    return new_tokens


def test_stories260k_greedy_equals_the_golden_tokens(stub, golden) -> None:
    request = generation_service_pb2.GenerateRequest(
        text=golden["prompt"],
        sampling_params=common_pb2.SamplingParams(temperature=0.0, max_tokens=len(golden["greedy_new_ids"])),
    )
    chunks = list(stub.Generate(request, timeout=120))
    assert [t for c in chunks for t in c.token_ids] == golden["greedy_new_ids"]
    assert golden["prompt"] + "".join(c.text for c in chunks) == golden["greedy_text"]
    assert chunks[-1].finish_reason == generation_service_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.prompt_tokens == len(golden["prompt_ids"])


def test_stories260k_greedy_equals_transformers_on_several_prompts(stub, stories_dir) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(stories_dir)
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert _generate_ids(stub, prompt_ids, 40) == _hf_greedy(stories_dir, prompt_ids, 40), prompt


def _tiny_config(architecture: str) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  initializer_range=0.2, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    if architecture == "llama":
        # rope_parameters: transformers 5's name for the deprecated rope_scaling; the config is the same.
        return transformers.LlamaConfig(**common, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64})
    if architecture == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_random_model_greedy_equals_transformers(architecture: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_dir = tmp_path / architecture
    # transformers leaves from_config unannotated.
    model = transformers.AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        _tiny_config(architecture), dtype=torch.float32)
    model.save_pretrained(model_dir)
    copy_tokenizer(model_dir)
    prompts = [[1, 5, 77, 300, 12], [1, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415,
                                     416, 2, 3], [1]]
    with running_cluster(model_dir, tmp_path / "logs") as cluster, grpc.insecure_channel(cluster.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        for prompt_ids in prompts:
            assert _generate_ids(stub, prompt_ids, 24) == _hf_greedy(model_dir, prompt_ids, 24), prompt_ids
