"""In bfloat16 on the GPU, teacher-forced next-token predictions agree with transformers' float32 logits on at
least 99% of positions (stories260K and each tiny architecture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.gpu_worker.config import DeviceKind, DType
from pagedserve.v1 import worker_service_pb2 as pb
from tests.gpu_worker.harness import STORIES_DIR, WorkerDriver, load_worker
from tests.gpu_worker.test_models import (
    HAS_CUDA_KERNELS,
    _llama3_rope_scaling,
    _llama_gqa_tied,
    _mistral,
    _qwen2,
    _qwen3,
    _save_tiny_model,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs CUDA and CuPy")]
BLOCK_SIZE = 16
MIN_AGREEMENT = 0.99


def _hf_sequences_and_argmax(model_dir: Path, num_sequences: int, length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy float32 continuations of short random prompts, and the float32 argmax at every position."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sequences, argmaxes = [], []
    with torch.no_grad():
        for _ in range(num_sequences):
            prompt = torch.randint(3, vocab, (1, 4), generator=generator)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length - 4,
                                 min_new_tokens=length - 4, do_sample=False)
            sequences.append(ids[0].tolist())
            argmaxes.append(model(ids).logits[0, :-1].argmax(-1).tolist())
    return sequences, argmaxes


def _bf16_argmax(model_dir: Path, sequences: list[list[int]]) -> list[list[int]]:
    """Our bfloat16 model's top-1 token at every position, from one prefill step with prompt logprobs."""
    num_blocks = sum(-(-len(s) // BLOCK_SIZE) for s in sequences)
    worker = load_worker(model_dir, BLOCK_SIZE, num_blocks=num_blocks, dtype=DType.BFLOAT16, device=DeviceKind.CUDA)
    driver = WorkerDriver(worker, BLOCK_SIZE, num_blocks)
    request = pb.ExecuteRequest()
    start = 0
    for seq_id, ids in enumerate(sequences):
        blocks = list(range(start, start + -(-len(ids) // BLOCK_SIZE)))
        start += len(blocks)
        sampling = pb.SequenceSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0, prompt_logprobs=1)
        request.new_sequences.append(pb.NewSequence(seq_id=seq_id, prompt_token_ids=ids, sampling=sampling,
                                                    block_ids=blocks, num_scheduled_tokens=len(ids)))
    response = driver.execute(request)
    return [[lp.top_token_ids[0] for lp in out.prompt_logprobs] for out in response.outputs]


@pytest.mark.parametrize(
    "make_model",
    [lambda tmp: STORIES_DIR, *(lambda tmp, c=c: _save_tiny_model(c(), tmp) for c in
                                (_llama_gqa_tied, _llama3_rope_scaling, _mistral, _qwen2, _qwen3))],
    ids=["stories260K", "llama-gqa-tied", "llama3-rope-scaling", "mistral", "qwen2", "qwen3"],
)
def test_bf16_teacher_forced_top1_agrees_with_float32_transformers(make_model, tmp_path: Path) -> None:
    model_dir = make_model(tmp_path)
    sequences, expected = _hf_sequences_and_argmax(model_dir, num_sequences=8, length=120)
    predicted = _bf16_argmax(model_dir, sequences)
    assert [len(p) for p in predicted] == [len(e) for e in expected]
    pairs = [(p, e) for ps, es in zip(predicted, expected) for p, e in zip(ps, es)]
    agreement = sum(p == e for p, e in pairs) / len(pairs)
    print(f"bf16 teacher-forced top-1 agreement {model_dir.name}: {agreement:.4f} over {len(pairs)} positions")
    assert agreement >= MIN_AGREEMENT
