"""What the control plane serves, as discovered from its workers at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The model behind the public API; built once the workers have reported and allocated their caches."""

    name: str
    architecture: str
    dtype: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_gpu_blocks: int
    num_workers: int
    eos_token_ids: tuple[int, ...]
