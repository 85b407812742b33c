"""The worker's view of one engine step and of its cache set-up (plain data, no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.gpu_worker.sampler import SamplingOptions, TokenLogprobs


class TableUpdate(NamedTuple):
    """table[start_index : start_index + len(block_ids)] = block_ids, growing the table as needed."""

    start_index: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence the worker has not seen, in full: tokens, sampling options, block table, what to compute."""

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    options: SamplingOptions
    block_ids: tuple[int, ...]
    num_computed_tokens: int
    num_scheduled_tokens: int
    fork_seq_ids: tuple[int, ...] = ()
    sample_index: int = 0


class ScheduledSequence(NamedTuple):
    """A sequence the worker holds, scheduled again: how many next tokens to compute and table changes."""

    seq_id: int
    num_scheduled_tokens: int
    table_updates: tuple[TableUpdate, ...] = ()


@dataclass(frozen=True, slots=True)
class StepRequest:
    """One step. Effects in order: drop, swap out, swap in, copy blocks, add new, update tables, compute."""

    step_id: int
    dropped_seq_ids: tuple[int, ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()  # (device block, cpu block)
    swap_in: tuple[tuple[int, int], ...] = ()  # (cpu block, device block)
    block_copies: tuple[tuple[int, int], ...] = ()  # (src device block, dst device block)
    new_sequences: tuple[NewSequence, ...] = ()
    scheduled_sequences: tuple[ScheduledSequence, ...] = ()


class SequenceResult(NamedTuple):
    """What one sequence produced: a token when the step reached the end of its known tokens."""

    seq_id: int
    token_id: int | None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True, slots=True)
class StepResult:
    """The answer to one StepRequest: one result per scheduled sequence and per forked sibling."""

    step_id: int
    results: tuple[SequenceResult, ...]
    step_time_ms: float
    forward_time_ms: float
    idle_time_ms: float = 0.0  # between the previous step's forward pass ending and this one's starting


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """InitCache arguments: block geometry and how much memory the pools may take."""

    block_size: int
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int = 0
    swap_space_bytes: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What InitCache allocated."""

    num_gpu_blocks: int
    num_cpu_blocks: int
    peak_activation_bytes: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What GetWorkerInfo reports."""

    worker_id: str
    model: str
    architecture: str
    dtype: str
    device: str
    vocab_size: int
    max_position_embeddings: int
    weight_bytes: int
    kv_bytes_per_token: int
    total_memory_bytes: int
    is_cache_initialized: bool
