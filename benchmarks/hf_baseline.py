"""Hugging Face transformers baselines on the same prompts and weights: static-batch `generate` and the
continuous-batching `generate_batch`."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.random_dataset import BenchRequest

_PAD_TOKEN_ID = 0


class HFBackend(enum.Enum):
    """Which transformers entry point generates."""

    GENERATE = "hf-generate"  # model.generate over padded static batches
    GENERATE_BATCH = "hf-generate-batch"  # model.generate_batch: transformers' continuous batching


@dataclass(frozen=True, slots=True)
class BackendRun:
    """Wall time of one backend over its requests and the tokens it produced for them."""

    backend: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    concurrency: int  # requests generated together at most, for the bound
    step_profile: dict[str, float] | None = None  # pagedserve only: where each engine step's time went
    step_kinds: list[dict[str, Any]] | None = None  # pagedserve only: the same, by kind of step

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "num_requests": self.num_requests, "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens, "elapsed_s": self.elapsed_s, "concurrency": self.concurrency,
            **({"step_profile": self.step_profile} if self.step_profile else {}),
            **({"step_kinds": self.step_kinds} if self.step_kinds else {}),
            "requests_per_s": self.num_requests / self.elapsed_s,
            "output_tokens_per_s": self.output_tokens / self.elapsed_s,
            "total_tokens_per_s": (self.prompt_tokens + self.output_tokens) / self.elapsed_s,
        }


def save_seeded_weights(model_dir: Path, dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """Initialises the directory's config with transformers' seeded init and saves model.safetensors beside it,
    so pagedserve and transformers load the very same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        # transformers leaves from_config unannotated.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.save_pretrained(model_dir)
    del model


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    # transformers wraps PreTrainedModel.to in functools.wraps, which mypy does not bind to the instance.
    return model.to(device).eval()  # type: ignore[arg-type]


def _generation_config(max_new_tokens: int, ignore_eos: bool) -> Any:
    from transformers import GenerationConfig

    # min_new_tokens = max_new_tokens suppresses EOS, which is how transformers spells ignore_eos.
    return GenerationConfig(  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=_PAD_TOKEN_ID,
        min_new_tokens=max_new_tokens if ignore_eos else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_one_batch(model: Any, batch: Sequence[BenchRequest], device: torch.device, ignore_eos: bool) -> int:
    """Left-pads the batch's prompts, generates to the batch's longest output; returns each request's own
    tokens (tokens generated past a request's output_len are padding work, not output)."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), _PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, width - len(request.prompt_token_ids):] = torch.tensor(request.prompt_token_ids)
        mask[row, width - len(request.prompt_token_ids):] = 1
    max_new = max(r.output_len for r in batch)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=_generation_config(max_new, ignore_eos))
    generated = out.shape[1] - width
    return sum(min(r.output_len, generated) for r in batch)


def run_generate(model: Any, requests: Sequence[BenchRequest], batch_size: int, device: torch.device,
                 ignore_eos: bool) -> BackendRun:
    """Static batches of batch_size in request order; one small batch first, untimed, to warm up."""
    _generate_one_batch(model, [BenchRequest(requests[0].prompt_token_ids[:8], 2)], device, ignore_eos)
    _sync(device)
    start = time.perf_counter()
    output_tokens = sum(_generate_one_batch(model, requests[i:i + batch_size], device, ignore_eos)
                        for i in range(0, len(requests), batch_size))
    _sync(device)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return BackendRun(HFBackend.GENERATE.value, len(requests), prompt_tokens, output_tokens, elapsed,
                      min(batch_size, len(requests)))


def run_generate_batch(model: Any, requests: Sequence[BenchRequest], attn_implementation: str,
                       ignore_eos: bool, num_blocks: int | None = None) -> BackendRun:
    """All requests through transformers' continuous batching (its warm-up is inside the timed call).

    num_blocks sizes its KV cache; None lets transformers size it from free device memory."""
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    extra: dict[str, Any] = {}
    if num_blocks is not None:
        from transformers import ContinuousBatchingConfig

        extra["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=num_blocks)
    max_new = max(r.output_len for r in requests)
    device = model.device
    _sync(device)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=[list(r.prompt_token_ids) for r in requests],
                                   generation_config=_generation_config(max_new, ignore_eos), **extra)
    _sync(device)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.generated_tokens) for o in outputs.values())
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return BackendRun(HFBackend.GENERATE_BATCH.value, len(requests), prompt_tokens, output_tokens, elapsed,
                      len(requests))
