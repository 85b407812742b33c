"""Turns one step's scheduled sequences into a flat batch, runs the model and samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.gpu_worker.kv_pool import KVPool
from pagedserve.gpu_worker.models.decoder import DecoderForCausalLM
from pagedserve.gpu_worker.models.layers import AttentionMetadata
from pagedserve.gpu_worker.sampler import Sampler, SamplingRow, TokenLogprobs
from pagedserve.gpu_worker.sequence_state import ScheduledWork
from pagedserve.gpu_worker.step import SequenceResult


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


def build_batch(work: list[ScheduledWork], block_size: int, device: torch.device) -> FlatBatch:
    """Vectorised batch build: positions, slots and padded block tables come from numpy, not per-token Python."""
    num_seqs = len(work)
    counts = np.fromiter((w.num_scheduled_tokens for w in work), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((w.state.num_computed_tokens for w in work), dtype=np.int64, count=num_seqs)
    ends = starts + counts
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start_loc[1:])
    # Row r of sequence s sits at position starts[s] + (r - query_start_loc[s]).
    positions = np.arange(query_start_loc[-1], dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, counts)
    input_ids: list[int] = []
    for item, start, end in zip(work, starts.tolist(), ends.tolist(), strict=True):
        input_ids.extend(item.state.token_ids(start, end))
    num_blocks = -(-ends // block_size)
    block_tables = np.zeros((num_seqs, max(int(num_blocks.max(initial=0)), 1)), dtype=np.int32)
    for row, (item, n) in enumerate(zip(work, num_blocks.tolist(), strict=True)):
        block_tables[row, :n] = item.state.block_table[:n]
    seq_index = np.repeat(np.arange(num_seqs), counts)
    slots = block_tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        block_tables=torch.from_numpy(block_tables).to(device),
        seq_lens=torch.from_numpy(ends.astype(np.int32)).to(device),
        query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)).to(device),
        max_query_len=int(counts.max(initial=0)),
        max_seq_len=int(ends.max(initial=0)),
    )
    return FlatBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device),
        positions=torch.from_numpy(positions).to(device),
        meta=meta,
        query_start_loc=query_start_loc,
    )


class ModelRunner:
    """Runs steps of one model over one KV pool; never changes sequence state (the registry commits results)."""

    def __init__(self, model: DecoderForCausalLM, pool: KVPool, sampler: Sampler) -> None:
        self.model = model
        self.pool = pool
        self.sampler = sampler

    @torch.inference_mode()
    def run(self, work: list[ScheduledWork]) -> list[SequenceResult]:
        """One result per work item in order, each sampling item followed by its newly forked siblings."""
        batch = build_batch(work, self.pool.block_size, self.pool.device)
        if batch.num_tokens == 0:
            return [SequenceResult(item.state.seq_id, None) for item in work]
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
