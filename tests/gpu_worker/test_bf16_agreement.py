"""In bfloat16 on the GPU, teacher-forced next-token predictions agree with transformers' float32 logits: on at
least 99% of positions for the trained stories260K model on story text, and, for each tiny random-weight
architecture (whose near-uniform logits make bf16 rounding flip many near-ties), as often as transformers' own
bfloat16 forward does, within half a percentage point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve.contract.model_format import DeviceKind, DType
from tests.gpu_marks import NEEDS_GPU
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, prompt_top_tokens
from tests.gpu_worker.tensor_parallel_harness import leader_of_group
from tests.gpu_worker.test_models import (
    _llama3_rope_scaling,
    _llama_gqa_tied,
    _mistral,
    _qwen2,
    _qwen3,
    _save_tiny_model,
)

pytestmark = NEEDS_GPU
BLOCK_SIZE = 16
MIN_AGREEMENT = 0.99
TINY_MODEL_MARGIN = 0.005
# One GPU, and the model sharded over two (tensor parallelism, NCCL) on a host that has them.
TP_SIZES = pytest.mark.parametrize("tp_size", [
    1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")),
])


STORY_PROMPTS = ["Once upon a time", "Lily and Tom went to the park.", "One day, a little dog", "The sun was shining",
                 "Tim had a big red ball.", "There was a small bird", "Mom said", "The cat sat"]


def _hf_sequences_and_argmax(
    model_dir: Path, prompts: list[list[int]], length: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Greedy float32 continuations of the prompts, then transformers' argmax at every position in float32 and
    in bfloat16 (the precision floor any bfloat16 implementation works against)."""
    # transformers leaves PreTrainedModel.eval unannotated.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    bf16_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()  # type: ignore[no-untyped-call]
    sequences, fp32_argmax, bf16_argmax = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            new = length - len(prompt)
            ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
            sequences.append(ids[0].tolist())
            fp32_argmax.append(model(ids).logits[0, :-1].argmax(-1).tolist())
            bf16_argmax.append(bf16_model(ids).logits[0, :-1].argmax(-1).tolist())
    return sequences, fp32_argmax, bf16_argmax


def _agreement(predicted: list[list[int]], expected: list[list[int]]) -> float:
    assert [len(p) for p in predicted] == [len(e) for e in expected]
    pairs = [(p, e) for ps, es in zip(predicted, expected, strict=True) for p, e in zip(ps, es, strict=True)]
    return sum(p == e for p, e in pairs) / len(pairs)


def _bf16_argmax(model_dir: Path, sequences: list[list[int]], tp_size: int) -> list[list[int]]:
    """Our bfloat16 model's top-1 token at every position, from one prefill step with prompt logprobs, sharded over
    tp_size GPUs."""
    num_blocks = sum(-(-len(s) // BLOCK_SIZE) for s in sequences)
    with leader_of_group(model_dir, tp_size, BLOCK_SIZE, num_blocks, dtype=DType.BFLOAT16,
                         device=DeviceKind.CUDA) as worker:
        return prompt_top_tokens(WorkerDriver(worker, BLOCK_SIZE, num_blocks), sequences)


@TP_SIZES
def test_bf16_teacher_forced_top1_agrees_with_float32_transformers_on_stories(tp_size: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(STORIES_DIR)
    prompts = [tokenizer(text)["input_ids"] for text in STORY_PROMPTS]
    sequences, expected, _ = _hf_sequences_and_argmax(STORIES_DIR, prompts, length=120)
    agreement = _agreement(_bf16_argmax(STORIES_DIR, sequences, tp_size), expected)
    print(f"bf16 teacher-forced top-1 agreement, stories260K, {tp_size} GPU(s): {agreement:.4f}")
    assert agreement >= MIN_AGREEMENT


@pytest.mark.parametrize(
    "make_config", [_llama_gqa_tied, _llama3_rope_scaling, _mistral, _qwen2, _qwen3],
    ids=["llama-gqa-tied", "llama3-rope-scaling", "mistral", "qwen2", "qwen3"],
)
@TP_SIZES
def test_bf16_teacher_forced_top1_matches_transformers_bf16_on_tiny_models(make_config, tp_size: int,
                                                                            tmp_path: Path) -> None:
    model_dir = _save_tiny_model(make_config(), tmp_path)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (4,), generator=generator).tolist() for _ in range(8)]
    sequences, expected, hf_bf16 = _hf_sequences_and_argmax(model_dir, prompts, length=120)
    ours, theirs = _agreement(_bf16_argmax(model_dir, sequences, tp_size), expected), _agreement(hf_bf16, expected)
    print(f"bf16 teacher-forced top-1 agreement, {make_config.__name__}, {tp_size} GPU(s): ours {ours:.4f}, "
          f"transformers {theirs:.4f}")
    assert ours >= theirs - TINY_MODEL_MARGIN
