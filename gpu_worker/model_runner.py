"""Turns one step's scheduled sequences into a flat batch, runs the model and samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedserve.gpu_worker.block_tables import BlockTableArray
from pagedserve.gpu_worker.kv_pool import KVPool
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.layers import AttentionMetadata
from pagedserve.gpu_worker.sampler import Sampler, SamplingRow, TokenLogprobs
from pagedserve.gpu_worker.sequence_state import ScheduledWork
from pagedserve.gpu_worker.step import SequenceResult

if TYPE_CHECKING:
    from pagedserve.gpu_worker.cuda_graph import CudaGraphRunner


@dataclass(frozen=True, slots=True)
class FlatBatch:
    """The step's tokens of every sequence, concatenated in work order.

    Sequence s owns rows query_start_loc[s] : query_start_loc[s + 1] (a host copy is kept for indexing).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    query_start_loc: np.ndarray  # [S + 1] int64, host

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def build_batch(work: list[ScheduledWork], tables: BlockTableArray, block_size: int, device: torch.device) -> FlatBatch:
    """Vectorised batch build: positions, slots and block tables come from numpy, not per-token Python.

    Everything travels to the device in two copies (one int64, one int32 buffer, pinned on CUDA hosts).
    """
    num_seqs = len(work)
    counts = np.fromiter((w.num_scheduled_tokens for w in work), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((w.state.num_computed_tokens for w in work), dtype=np.int64, count=num_seqs)
    rows = np.fromiter((w.state.table_row for w in work), dtype=np.int64, count=num_seqs)
    ends = starts + counts
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    # Row r of sequence s sits at position starts[s] + (r - query_start_loc[s]).
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, counts)
    block_tables = tables.gather(rows, max(int((-(-ends // block_size)).max(initial=0)), 1))
    seq_index = np.repeat(np.arange(num_seqs), counts)
    slots = block_tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size

    is_pinned = device.type == "cuda"
    longs = torch.empty(3 * num_tokens, dtype=torch.int64, pin_memory=is_pinned)
    longs_host = longs.numpy()
    longs_host[:num_tokens] = _input_ids(work, starts, ends, is_decode=num_tokens == num_seqs)
    longs_host[num_tokens : 2 * num_tokens] = positions
    longs_host[2 * num_tokens :] = slots
    table_size = block_tables.size
    ints = torch.empty(table_size + 2 * num_seqs + 1, dtype=torch.int32, pin_memory=is_pinned)
    ints_host = ints.numpy()
    ints_host[:table_size] = block_tables.reshape(-1)
    ints_host[table_size : table_size + num_seqs] = ends
    ints_host[table_size + num_seqs :] = query_start_loc
    longs_device = longs.to(device, non_blocking=True)
    ints_device = ints.to(device, non_blocking=True)
    meta = AttentionMetadata(
        slot_mapping=longs_device[2 * num_tokens :],
        block_tables=ints_device[:table_size].view(block_tables.shape),
        seq_lens=ints_device[table_size : table_size + num_seqs],
        query_start_loc=ints_device[table_size + num_seqs :],
        max_query_len=int(counts.max(initial=0)),
        max_seq_len=int(ends.max(initial=0)),
    )
    return FlatBatch(longs_device[:num_tokens], longs_device[num_tokens : 2 * num_tokens], meta, query_start_loc)


def _input_ids(work: list[ScheduledWork], starts: np.ndarray, ends: np.ndarray, is_decode: bool) -> list[int]:
    """The step's token ids in batch order; decode steps (one token each) skip the per-sequence slicing."""
    if is_decode:
        return [item.state.token_id(start) for item, start in zip(work, starts.tolist(), strict=True)]
    return [t for item, start, end in zip(work, starts.tolist(), ends.tolist(), strict=True)
            for t in item.state.token_ids(start, end)]


class ModelRunner:
    """Runs steps of one model over one KV pool; never changes sequence state (the registry commits results)."""

    def __init__(self, model: DecoderForCausalLM, pool: KVPool, tables: BlockTableArray, sampler: Sampler,
                 graph_runner: CudaGraphRunner | None = None) -> None:
        self.model = model
        self.pool = pool
        self.tables = tables
        self.sampler = sampler
        self.graph_runner = graph_runner

    @torch.inference_mode()
    def run(self, work: list[ScheduledWork]) -> list[SequenceResult]:
        """One result per work item in order, each sampling item followed by its newly forked siblings."""
        batch = build_batch(work, self.tables, self.pool.block_size, self.pool.device)
        if batch.num_tokens == 0:
            return [SequenceResult(item.state.seq_id, None) for item in work]
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            hidden = self.graph_runner.run(batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.pool.gpu_cache)
        sampled = self._sample(work, batch, hidden)
        results = []
        for index, item in enumerate(work):
            state = item.state
            prompt_logprobs = self._prompt_logprobs(item, int(batch.query_start_loc[index]), hidden)
            token, logprobs = sampled.get(state.seq_id, (None, None))
            results.append(SequenceResult(state.seq_id, token, logprobs, prompt_logprobs))
            if token is not None:
                results.extend(SequenceResult(s, *sampled[s]) for s in state.fork_seq_ids)
        return results

    def _sample(
        self, work: list[ScheduledWork], batch: FlatBatch, hidden: torch.Tensor
    ) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Samples one token per sampling sequence (and per pending sibling, from the same logits row)."""
        hidden_rows: list[int] = []
        rows: list[SamplingRow] = []
        seq_ids: list[int] = []
        for index, item in enumerate(work):
            if not item.is_sampling:
                continue
            state = item.state
            last_row = int(batch.query_start_loc[index + 1]) - 1
            for seq_id, sample_index in zip(
                (state.seq_id, *state.fork_seq_ids), (state.sample_index, *state.sibling_sample_indices), strict=True
            ):
                rows.append(SamplingRow(state.options, state.prompt_token_ids, state.output_token_ids, sample_index))
                hidden_rows.append(last_row)
                seq_ids.append(seq_id)
        if not rows:
            return {}
        row_index = torch.tensor(hidden_rows, dtype=torch.int64).to(hidden.device)
        result = self.sampler.sample(self.model.compute_logits(hidden[row_index]), rows)
        return dict(zip(seq_ids, zip(result.token_ids, result.logprobs, strict=True), strict=True))

    def _prompt_logprobs(self, item: ScheduledWork, first_row: int, hidden: torch.Tensor) -> tuple[TokenLogprobs, ...]:
        """Log-probabilities of the prompt tokens that follow this step's prompt positions, when asked.

        Position p predicts prompt token p + 1, so positions [start, min(end, num_prompt - 1)) count.
        """
        state = item.state
        k = state.options.prompt_logprobs
        start = state.num_computed_tokens
        stop = min(item.end, len(state.prompt_token_ids) - 1)
        if k is None or stop <= start:
            return ()
        rows = torch.arange(first_row, first_row + stop - start, device=hidden.device)
        targets = state.prompt_token_ids[start + 1 : stop + 1]
        return tuple(self.sampler.prompt_logprobs(self.model.compute_logits(hidden[rows]), targets, k))
